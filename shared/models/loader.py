"""Loading a Hugging Face-layout checkpoint directory into a Tandem model.

One mapping serves two callers: `check_checkpoint` validates a directory from the safetensors headers
alone (import time: no tensor is read), and `load_model` reads the tensors. A checkpoint tensor maps
to either a parameter by name or one expert's slice of a stacked expert parameter:

    model.layers.3.mlp.experts.5.up_proj.weight  ->  model.layers.3.mlp.experts.up_proj[5]

Anything missing, unexpected or of the wrong shape is a WeightError naming the tensor.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from shared.models import model_class, quant
from shared.models.config import ConfigError, ModelConfig, from_hf_config
from shared.models.lora import AdapterError, is_adapter_dir, merge_adapter, read_adapter_config
from shared.models.transformer import CausalLM

_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# Tensors some checkpoints carry that are derived, not learned.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.masked_bias)$")
# buffers a checkpoint carries: MoE routers' correction biases, quantized layers' integers and scales
_LOADED_BUFFERS = ("e_score_correction_bias", ".qweight", ".scales", ".offsets")


class WeightError(ValueError):
    """A checkpoint whose tensors do not fit its config, naming the tensor at fault."""


@dataclass(frozen=True)
class Target:
    param: str
    expert: int | None = None  # index into a stacked expert parameter


def read_config(path: Path) -> ModelConfig:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{path}: config.json is missing")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_file}: not valid JSON ({e})") from e
    return from_hf_config(raw)


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it (single file or sharded with index)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightError(f"{index}: not a valid safetensors index ({e})") from e
        files = {name: path / fname for name, fname in weight_map.items()}
        root = path.resolve()
        for f in set(files.values()):
            if not f.resolve().is_relative_to(root):  # e.g. "../elsewhere.safetensors"
                raise WeightError(f"{index} names {f}, outside the model directory")
            if not f.is_file():
                raise WeightError(f"{index} names {f.name}, which is missing")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return {name: single for name in _tensor_names(single)}
    raise WeightError(f"{path}: no model.safetensors (or model.safetensors.index.json) found")


def _tensor_names(file: Path) -> list[str]:
    try:
        with safe_open(str(file), "pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise WeightError(f"{file.name} is not a readable safetensors file: {e}") from e


def _target(cls: type[CausalLM], name: str) -> Target | None:
    if _IGNORED.search(name):
        return None
    name = cls.checkpoint_name(name)
    m = _EXPERT.match(name)
    if m:
        return Target(f"{m.group(1)}.{m.group(3)}", int(m.group(2)))
    return Target(name)


def _expected_shapes(model: CausalLM) -> dict[str, tuple[int, ...]]:
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    shapes.update({n: tuple(b.shape) for n, b in model.named_buffers() if n.endswith(_LOADED_BUFFERS)})
    return shapes


def _meta_model(path: Path, cfg: ModelConfig) -> CausalLM:
    """The model for a checkpoint on the meta device, with QuantLinears where a quantized
    checkpoint (shared/models/quant.py) keeps integer weights."""
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    q = quant.config_of(json.loads((Path(path) / "config.json").read_text()))
    if q is not None:
        quant.quantized_layout(model, q)
    return model


def plan_checkpoint(path: Path, cfg: ModelConfig) -> dict[str, tuple[Path, Target]]:
    """Map every checkpoint tensor to its target, validating names and shapes from headers only."""
    cls = model_class(cfg)
    model = _meta_model(path, cfg)
    expected = _expected_shapes(model)
    files = checkpoint_files(path)
    plan: dict[str, tuple[Path, Target]] = {}
    covered: dict[str, set[int] | None] = {}
    shapes = _header_shapes(files)
    for name, file in files.items():
        target = _target(cls, name)
        if target is None:
            continue
        want = expected.get(target.param)
        if want is None:
            if target.param == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # some tied checkpoints still carry a copy
            raise WeightError(f"unexpected tensor '{name}' for {cfg.architecture} with this config.json")
        got = shapes[name]
        if target.expert is not None:
            if target.expert >= want[0]:
                raise WeightError(
                    f"tensor '{name}': expert {target.expert} but the config has {want[0]} experts"
                )
            want = want[1:]
        if tuple(got) != tuple(want):
            raise WeightError(f"tensor '{name}' has shape {list(got)} but config.json implies {list(want)}")
        plan[name] = (file, target)
        if target.expert is None:
            covered[target.param] = None
        else:
            covered.setdefault(target.param, set()).add(target.expert)
    tied = (
        {"lm_head.weight"}
        if cfg.tie_word_embeddings and isinstance(model.lm_head, torch.nn.Linear)
        else set()
    )
    for param, shape in expected.items():
        if param in tied:
            continue
        if param not in covered:
            raise WeightError(f"checkpoint is missing tensor for '{param}' (shape {list(shape)})")
        have = covered[param]
        if have is not None and len(have) != shape[0]:
            missing = sorted(set(range(shape[0])) - have)[:5]
            raise WeightError(f"checkpoint is missing experts {missing} of '{param}'")
    return plan


def _header_shapes(files: dict[str, Path]) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for file in set(files.values()):
        try:
            with safe_open(str(file), "pt") as f:
                for name in f.keys():
                    shapes[name] = list(f.get_slice(name).get_shape())
        except (SafetensorError, OSError) as e:
            raise WeightError(f"{file.name} is not a readable safetensors file: {e}") from e
    missing = set(files) - set(shapes)
    if missing:
        raise WeightError(f"index names tensors absent from their files: {sorted(missing)[:5]}")
    return shapes


def check_checkpoint(path: Path) -> ModelConfig:
    """Validate a checkpoint directory without reading tensor data; returns its config."""
    cfg = read_config(path)
    plan_checkpoint(path, cfg)
    return cfg


def load_model(
    path: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> CausalLM:
    """Build the model for a checkpoint directory and load its weights (eval mode, no grad).

    A LoRA adapter directory (adapter_config.json, no config.json) loads its base, named by the
    adapter's base_model_name_or_path (a directory, or a sibling in the same model store), with the
    adapter merged into the weights."""
    path = Path(path)
    if is_adapter_dir(path):
        return merge_adapter(load_model(adapter_base(path), device, dtype), path)
    cfg = read_config(path)
    plan = plan_checkpoint(path, cfg)
    model = _meta_model(path, cfg)
    state = _read_tensors(plan, _expected_shapes(model), device, dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.rotary.materialize(device)
    return model.eval().requires_grad_(False)


def adapter_base(path: Path) -> Path:
    base = read_adapter_config(path).get("base_model_name_or_path")
    if not base:
        raise AdapterError(f"{path}: adapter_config.json does not name its base model")
    base_path = Path(base) if Path(base).is_absolute() else Path(path).parent / base
    if not base_path.is_dir():
        raise AdapterError(f"{path}: base model '{base}' not found (looked in {base_path})")
    return base_path


def _read_tensors(plan, expected, device, dtype) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, (file, _) in plan.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), "pt", device="cpu") as f:
            for name in names:
                target = plan[name][1]
                tensor = f.get_tensor(name)
                # Router correction biases stay float32: they decide ties between close scores; a
                # quantized layer's integers stay integers.
                want = torch.float32 if target.param.endswith("e_score_correction_bias") else dtype
                if not tensor.is_floating_point():
                    want = tensor.dtype
                if target.expert is None:
                    state[target.param] = tensor.to(device=device, dtype=want)
                else:
                    if target.param not in state:
                        state[target.param] = torch.empty(expected[target.param], dtype=want, device=device)
                    state[target.param][target.expert].copy_(tensor)
    return state
