"""GGUF -> a Hugging Face-layout checkpoint directory (config.json, model.safetensors, tokenizer files).

Supported: GGUF files of the `llama` architecture with a `gpt2` (byte-level BPE) tokenizer — the
default model, SmolLM2-135M-Instruct, is one. Quantised tensors are dequantised to float32 with the
`gguf` package's reference dequantisers.

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


def _tensors(reader, cfg: dict) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
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


def import_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write a complete checkpoint directory for `gguf_path` into the (empty) `out_dir`."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise StoreError(f"GGUF file not found: {gguf_path}")
    reader = _reader(gguf_path)
    cfg = _config(reader)
    tensors = _tensors(reader, cfg)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    generation = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg[k] is not None}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _tokenizer_files(reader, out_dir)
