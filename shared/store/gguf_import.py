"""GGUF -> a Hugging Face-layout checkpoint directory (config.json, model.safetensors, tokenizer files).

Supported: GGUF files of the `llama` architecture with a `gpt2` (byte-level BPE) tokenizer — the
default model, SmolLM2-135M-Instruct, is one. Quantised tensors are dequantised to float32 with the
`gguf` package's reference dequantisers, or, with `keep_quantized`, Q4_0 / Q4_1 / Q8_0 projections and
head keep their integers and scales in Tandem's quantized layout (shared/models/quant.py).

Two things llama.cpp's converter changed, undone here:
  * q/k projection rows are permuted for interleaved RoPE. Per head, HF row order is
    [r0, r1, ..., r(D/2-1) | r(D/2), ..., r(D-1)] (rotate-half pairs i and i+D/2); GGUF stores the
    pairs adjacent: [r0, r(D/2), r1, r(D/2+1), ...]. Reshape each head to [D/2, 2, ...] and swap.
  * tensor names (blk.N.attn_q.weight -> model.layers.N.self_attn.q_proj.weight, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from shared.store.errors import StoreError

_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises bare ValueError/struct errors on damaged files
        raise StoreError(f"{path} is not a readable GGUF file: {e}") from e


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _NAMES:
        return _NAMES[gguf_name]
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    raise StoreError(f"GGUF tensor '{gguf_name}' has no known meaning for the llama architecture")


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise StoreError(f"GGUF architecture '{arch}' is not supported for import (supported: llama)")

    def meta(key: str, default=None):
        value = _field(reader, f"llama.{key}", default)
        if value is None:
            raise StoreError(f"GGUF metadata 'llama.{key}' is missing")
        return value

    heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    n_vocab = len(_field(reader, "tokenizer.ggml.tokens", []))
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    eps = float(f"{float(meta('attention.layer_norm_rms_epsilon')):.7g}")  # stored as float32
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(_field(reader, "llama.vocab_size", n_vocab)),
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": int(meta("rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(meta("context_length")),
        "rms_norm_eps": eps,
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def _tensors(reader, cfg: dict, skip: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        if _hf_name(t.name) in skip:
            continue
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists the innermost dimension first
        try:
            data = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        except Exception as e:
            raise StoreError(f"GGUF tensor '{t.name}' could not be dequantised: {e}") from e
        name = _hf_name(t.name)
        if name.endswith("q_proj.weight"):
            data = _unpermute(data, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            data = _unpermute(data, cfg["num_key_value_heads"])
        out[name] = torch.from_numpy(np.ascontiguousarray(data))  # owns its memory (copied above)
    return out


_KEPT = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # GGUF types whose integers are kept as they are


def _blocks(t) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(integers [rows, in] (int8 or 0-15), scales and offsets [rows, in / 32], bits) of a Q4_0 / Q4_1 /
    Q8_0 tensor: its blocks' own integers and scales, rearranged, never turned into floats."""
    kind = t.tensor_type.name
    rows = t.data.shape[0]
    if kind == "Q8_0":  # {f16 d; int8 q[32]}: w = q * d
        b = t.data.reshape(rows, -1, 34)
        d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        return b[..., 2:].copy().view(np.int8).reshape(rows, -1), d, np.zeros_like(d), 8
    size = (
        20 if kind == "Q4_1" else 18
    )  # Q4_1 {f16 d; f16 m; u8 qs[16]}: w = q * d + m; Q4_0 {f16 d; u8 qs[16]}: (q - 8) * d
    b = t.data.reshape(rows, -1, size)
    d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if kind == "Q4_1" else -8 * d
    qs = b[..., size - 16 :]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # a block's values 0-15 in the low nibbles, 16-31 high
    return q.reshape(rows, -1), d, m, 4


def _kept_tensors(reader, cfg: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """The checkpoint of a GGUF whose projections are Q4_0 / Q4_1 (or Q8_0) and whose LM head (or the
    embedding it is tied to) is Q8_0, with those integers kept (shared/models/quant.py's layout):
    group 32, as GGUF's blocks. The embedding itself becomes float (a lookup reads one row a token)."""
    from shared.models.quant import Scheme, pack_nibbles

    types = {_hf_name(t.name): t.tensor_type.name for t in reader.tensors}
    projections = {
        n: k for n, k in types.items() if n.startswith("model.layers.") and n.endswith("_proj.weight")
    }
    head = types.get("lm_head.weight", types.get("model.embed_tokens.weight"))
    bits = {_KEPT.get(k) for k in projections.values()}
    if None in bits or len(bits) != 1 or head != "Q8_0":
        found = sorted({*projections.values(), head or "none"})
        raise StoreError(f"keeping GGUF integers needs Q4_0 / Q4_1 or Q8_0 projections and a Q8_0 output; "
                         f"this file has {', '.join(found)}: import it without --keep-quantized")  # fmt: skip
    scheme = Scheme(bits.pop(), 32, 8, 32)
    out = _tensors(
        reader, cfg, skip=set(projections) | ({"lm_head.weight"} if "lm_head.weight" in types else set())
    )
    for t in reader.tensors:
        name = _hf_name(t.name)
        target = name if name in projections or name == "lm_head.weight" else None
        if name == "model.embed_tokens.weight" and cfg["tie_word_embeddings"]:
            target = "lm_head.weight"
        if target is None:
            continue
        q, d, m, b = _blocks(t)
        heads = cfg["num_attention_heads"] if target.endswith("q_proj.weight") else cfg["num_key_value_heads"]
        if target.endswith(("q_proj.weight", "k_proj.weight")):  # the rows (and their scales) move together
            q, d, m = (_unpermute(x, heads) for x in (q, d, m))
        base = target.removesuffix(".weight")
        qt = torch.from_numpy(np.ascontiguousarray(q))
        out[f"{base}.qweight"] = qt if b == 8 else pack_nibbles(qt)
        out[f"{base}.scales"] = torch.from_numpy(np.ascontiguousarray(d))
        out[f"{base}.offsets"] = torch.from_numpy(np.ascontiguousarray(m))
    return out, scheme.to_config()


def _tokenizer_files(reader, out_dir: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise StoreError(f"GGUF tokenizer model '{model}' is not supported (supported: gpt2 byte-level BPE)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    # Byte-level BPE with single digits, as llama.cpp's gpt2-style pre-tokenizers (smollm, starcoder) do.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    control = [
        AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types, strict=True) if ty == 3
    ]
    tok.add_special_tokens(control)
    tok.save(str(out_dir / "tokenizer.json"))

    def token(key: str) -> str | None:
        idx = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[idx] if idx is not None else None

    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, "llama.context_length", 2048)),
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))


def import_gguf(gguf_path: Path, out_dir: Path, keep_quantized: bool = False) -> None:
    """Write a complete checkpoint directory for `gguf_path` into the (empty) `out_dir`; with
    `keep_quantized`, the projections' and the head's integers as the file has them (_kept_tensors)."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise StoreError(f"GGUF file not found: {gguf_path}")
    reader = _reader(gguf_path)
    cfg = _config(reader)
    if keep_quantized:
        tensors, cfg["quantization_config"] = _kept_tensors(reader, cfg)
    else:
        tensors = _tensors(reader, cfg)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    generation = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg[k] is not None}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _tokenizer_files(reader, out_dir)
