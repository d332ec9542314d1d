"""Serving a LoRA fine-tune: merge a PEFT-format adapter into the base model's weights.

An adapter directory holds adapter_config.json (r, lora_alpha, use_rslora, target_modules) and
adapter_model.safetensors with tensors named as PEFT saves them for a transformers model:

    base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight   [out, r]

Tandem's modules carry the transformers names, so the path after `base_model.model.` is the module.
Merging W += s · B @ A (s = alpha / r, or alpha / sqrt(r) with rsLoRA) makes the served model compute
exactly base + adapter with no per-token overhead. `LoraBank` instead keeps many adapters beside the
base weights and applies each to its own requests' tokens (multi-LoRA serving: fine-tunes of one base
share its workers and batches). Training applies adapters with `peft` itself.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from shared.models.linear import Linear
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


# -- many adapters at once, per token (multi-LoRA serving) -------------------------------------------


class LoraBank:
    """Several LoRA adapters over one inference model, chosen per token: requests for different
    adapters and for the base model share a batch. The model's weights stay the base's; each adapted
    `Linear` adds `(x @ A^T) @ (s·B)^T` to the rows of the tokens whose request uses that adapter.

    Attached from outside (every Linear gets a `lora` hook; the model code does not change). The
    engine's fused projections take their parts' adapters side by side: for qkv_proj, A is the parts'
    A stacked [r_q + r_k + r_v, in] and B block-diagonal [out_q + out_k + out_v, r_q + r_k + r_v], so
    one pair of small GEMMs serves all three.

        bank = LoraBank(model)              # after fuse_for_inference()
        bank.load("ft:...", adapter_dir)     # checked against the model; unload(name) frees it
        with bank.active(["ft:...", None, ...]):   # the adapter of every token of the step
            hidden = model(...)
    """

    def __init__(self, model: CausalLM):
        self.adapters: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.groups: list[tuple[str, torch.Tensor]] = []  # (adapter, token rows) of the current step
        self.parts: dict[str, tuple[str, int, int]] = {}  # adapter module name → (module, out offset, size)
        self.modules = {}
        for name, module in model.named_modules():
            if isinstance(module, Linear):
                module.lora = _LinearLora(self, name)
                self.modules[name] = module
                self.parts[name] = (name, 0, module.out_features)
            fused = _fused_parts(module)
            for part, offset, size in fused:
                target = f"{name}.{'qkv_proj' if part in ('q_proj', 'k_proj', 'v_proj') else 'gate_up_proj'}"
                self.parts[f"{name}.{part}"] = (target, offset, size)

    def has(self, name: str) -> bool:
        return name in self.adapters

    def load(self, name: str, path: Path) -> None:
        cfg = read_adapter_config(path)
        r, alpha = cfg["r"], cfg["lora_alpha"]
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        tensors = load_file(str(Path(path) / ADAPTER_WEIGHTS))
        by_module: dict[str, list[tuple[int, int, torch.Tensor, torch.Tensor]]] = {}
        for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
            name_in = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            b_key = key.replace(".lora_A.weight", ".lora_B.weight")
            if name_in not in self.parts or b_key not in tensors:
                raise AdapterError(
                    f"adapter tensor '{key}' names no linear layer of the base model (or lacks B)"
                )
            target, offset, size = self.parts[name_in]
            a, b = tensors[key], tensors[b_key]
            weight = self.modules[target].weight
            if a.shape[1] != weight.shape[1] or b.shape[0] != size or a.shape[0] != b.shape[1]:
                raise AdapterError(
                    f"adapter for '{name_in}' has A {list(a.shape)} and B {list(b.shape)}, which do not fit"
                )
            by_module.setdefault(target, []).append((offset, size, a, b * scale))
        if not by_module:
            raise AdapterError(f"{path}: {ADAPTER_WEIGHTS} holds no LoRA tensors")
        weights = {}
        for target, parts in by_module.items():
            module = self.modules[target]
            dev, dt = module.weight.device, module.weight.dtype
            ranks = [a.shape[0] for _, _, a, _ in parts]
            a_all = torch.cat([a for _, _, a, _ in parts]).to(dev, dt)  # [R, in]
            b_all = torch.zeros(module.out_features, sum(ranks), device=dev, dtype=dt)  # [out, R]
            col = 0
            for (offset, size, _, b), rank in zip(parts, ranks, strict=True):
                b_all[offset : offset + size, col : col + rank] = b
                col += rank
            weights[target] = (a_all, b_all)
        self.adapters[name] = weights

    def unload(self, name: str) -> None:
        self.adapters.pop(name, None)

    @contextmanager
    def active(self, token_adapters: list[str | None], device: torch.device):
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(token_adapters):
            if name is not None:
                rows.setdefault(name, []).append(i)
        self.groups = [(n, torch.tensor(r, dtype=torch.long, device=device)) for n, r in rows.items()]
        try:
            yield
        finally:
            self.groups = []


class _LinearLora:
    """A Linear's hook: adds each active adapter's delta to its tokens' rows of the output."""

    def __init__(self, bank: LoraBank, name: str):
        self.bank, self.name = bank, name

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        for adapter, rows in self.bank.groups:
            w = self.bank.adapters[adapter].get(self.name)
            if w is not None:
                a, b = w
                out.index_add_(0, rows, (x[rows] @ a.t()) @ b.t())  # [n, in] → [n, R] → [n, out]
        return out


def _fused_parts(module) -> list[tuple[str, int, int]]:
    """(part name, output offset, size) of a fused projection's original layers, if it has one."""
    qkv = getattr(module, "qkv_proj", None)
    if isinstance(qkv, Linear) and hasattr(module, "num_kv_heads"):
        q, kv = module.num_heads * module.head_dim, module.num_kv_heads * module.head_dim
        return [("q_proj", 0, q), ("k_proj", q, kv), ("v_proj", q + kv, kv)]
    gate_up = getattr(module, "gate_up_proj", None)
    if isinstance(gate_up, Linear):
        i = gate_up.out_features // 2
        return [("gate_proj", 0, i), ("up_proj", i, i)]
    return []
