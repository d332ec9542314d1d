"""Serving a LoRA fine-tune: merge a PEFT-format adapter into the base model's weights.

An adapter directory holds adapter_config.json (r, lora_alpha, use_rslora, target_modules) and
adapter_model.safetensors with tensors named as PEFT saves them for a transformers model:

    base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight   [out, r]

Tandem's modules carry the transformers names, so the path after `base_model.model.` is the module.
Merging W += s · B @ A (s = alpha / r, or alpha / sqrt(r) with rsLoRA) makes the served model compute
exactly base + adapter with no per-token overhead. Training applies adapters with `peft` itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from shared.models.transformer import CausalLM

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


class AdapterError(ValueError):
    pass


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file() and not (Path(path) / "config.json").is_file()


def read_adapter_config(path: Path) -> dict:
    try:
        cfg = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: unreadable {ADAPTER_CONFIG} ({e})") from e
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(
            f"{path}: only LoRA adapters are supported, got peft_type {cfg.get('peft_type')!r}"
        )
    for unsupported in ("rank_pattern", "alpha_pattern"):
        if cfg.get(unsupported):
            raise AdapterError(f"{path}: adapter_config.json uses {unsupported}, which Tandem does not merge")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{path}: adapters with modules_to_save are not supported")
    return cfg


def adapter_pairs(path: Path, model: CausalLM) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(module name, A [r, in], B [out, r]) for every adapted module, checked against the model."""
    tensors = load_file(str(Path(path) / ADAPTER_WEIGHTS))
    modules = dict(model.named_modules())
    pairs = []
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        name = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        b_key = key.replace(".lora_A.weight", ".lora_B.weight")
        module = modules.get(name)
        if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise AdapterError(f"adapter tensor '{key}' names no linear layer of the base model")
        if b_key not in tensors:
            raise AdapterError(f"adapter tensor '{b_key}' is missing")
        a, b = tensors[key], tensors[b_key]
        out_f, in_f = module.weight.shape
        if a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"adapter for '{name}' has A {list(a.shape)} and B {list(b.shape)}, "
                f"which do not fit its weight {list(module.weight.shape)}"
            )
        pairs.append((name, a, b))
    if not pairs:
        raise AdapterError(f"{path}: {ADAPTER_WEIGHTS} holds no LoRA tensors")
    return pairs


def merge_adapter(model: CausalLM, path: Path) -> CausalLM:
    cfg = read_adapter_config(path)
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, a, b in adapter_pairs(path, model):
            weight = modules[name].weight
            delta = (b.to(torch.float32) @ a.to(torch.float32)) * scale  # [out, in]
            weight.add_(delta.to(device=weight.device, dtype=weight.dtype))
    return model
