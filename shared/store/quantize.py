"""`tandem models quantize`: a model in the store rewritten with 8- or 4-bit weights.

    quantize(src_dir, dst_dir, bits=4, group_size=32)

The source's float weights are loaded, the decoder's projections and the LM head replaced by
QuantLinears (shared/models/quant.py: round to nearest per group), and the result written as a
checkpoint the loader reads back as is: the integers, scales and offsets under the layers' names,
and `quantization_config` in config.json. Tokenizer files come along.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from shared.models import quant
from shared.models.loader import load_model

_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
           "chat_template.jinja")  # fmt: skip


class QuantizeError(ValueError):
    pass


def quantize(src: Path, dst: Path, bits: int, group_size: int | None = None) -> dict:
    """Write the quantized checkpoint into `dst` (an empty directory); returns its config. Group size
    default: per channel (0) for 8 bits, 32 for 4 bits (quant.Scheme.default)."""

    src, dst = Path(src), Path(dst)
    cfg = json.loads((src / "config.json").read_text())
    if quant.config_of(cfg) is not None:
        raise QuantizeError(f"{src.name} is quantized already")
    if bits not in (4, 8):
        raise QuantizeError(f"--bits must be 4 or 8, got {bits}")
    if group_size is not None and group_size and (group_size < 2 or group_size % 2):
        raise QuantizeError(
            f"--group-size must be 0 (per channel) or an even number of at least 2, got {group_size}"
        )
    scheme = quant.Scheme.default(bits, group_size)
    model = load_model(src)
    if not quant.targets(model, scheme):
        raise QuantizeError(f"no layer of {src.name} has a multiple of {group_size} inputs")
    quant.quantize_model(model, scheme)
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items() if "rotary" not in name}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(dst / "model.safetensors"))
    cfg["quantization_config"] = scheme.to_config()
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in _COPIED:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return cfg


def layer_errors(src: Path, dst: Path) -> dict[str, float]:
    """Per quantized layer, the largest |w - dequantized w| relative to the layer's largest |w|."""
    ref, q = load_model(src), load_model(dst)
    out = {}
    for name, m in q.named_modules():
        if isinstance(m, quant.QuantLinear):
            w = ref.get_submodule(name).weight
            out[name] = float((m.dequantize() - w).abs().max() / w.abs().max())
    return out
