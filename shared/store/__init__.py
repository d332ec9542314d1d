"""The model store: models by name on disk, imported atomically from GGUF files or HF checkpoints."""

from shared.store.builtin import BUILTIN, DEFAULT_MODEL
from shared.store.errors import StoreError
from shared.store.model_store import ModelInfo, ModelStore

__all__ = ["BUILTIN", "DEFAULT_MODEL", "ModelInfo", "ModelStore", "StoreError"]
