"""LoRA for training: `peft` applied to Tandem's own modules, adapters saved in the PEFT format.

peft's `inject_adapter_in_model` wraps every targeted nn.Linear (Tandem's Linear is one) in a LoRA
layer and freezes everything else, so the model code stays as it is. The saved adapter carries the
names a transformers model of the same base has (`base_model.model.model.layers.N...`), so
`peft.PeftModel.from_pretrained` loads it onto the transformers model, and Tandem serves it by
merging (shared/models/lora.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

from shared.models.lora import ADAPTER_WEIGHTS, PREFIX
from shared.models.transformer import CausalLM
from shared.train.config import JobError, LoraSpec


def lora_config(spec: LoraSpec, base_model: str | None = None) -> LoraConfig:
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        base_model_name_or_path=base_model,
        task_type="CAUSAL_LM",
        bias="none",
    )


def apply_lora(model: CausalLM, spec: LoraSpec) -> CausalLM:
    """Freeze the model and add trainable LoRA weights to the target modules (in place)."""
    model.requires_grad_(False)
    try:
        return inject_adapter_in_model(lora_config(spec), model)
    except ValueError as e:  # e.g. no module matched target_modules
        raise JobError(f"lora.target_modules: {e}") from e


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the names PEFT writes for a transformers model."""
    return {PREFIX + k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(model, {k.removeprefix(PREFIX): v for k, v in state.items()})
    bad = [k for k in result.unexpected_keys if "lora_" in k]
    if bad:
        raise JobError(f"adapter tensors do not fit the model: {bad[:3]}")


def save_adapter(directory: Path, state: dict[str, torch.Tensor], spec: LoraSpec, base_model: str) -> None:
    directory = Path(directory)
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    lora_config(spec, base_model).save_pretrained(str(directory))  # writes ADAPTER_CONFIG


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The base model's function (DPO's frozen reference when training LoRA)."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)
