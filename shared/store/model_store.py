"""The model store: a directory of servable models by name.

    <root>/<name>/config.json               Hugging Face config
                  model.safetensors         (or model-0000N-of-0000M.safetensors + index)
                  tokenizer.json            when the model has a tokenizer
                  tokenizer_config.json     special tokens and the chat template
                  generation_config.json
                  tandem.json               what `models list` shows: architecture, params, dtype, source
    <root>/<name>/adapter_config.json       a LoRA fine-tune instead: the adapter (PEFT format), the
                  adapter_model.safetensors base's tokenizer files, and tandem.json naming the base

Every full model in the store is a Hugging Face-layout checkpoint, so transformers can load it too;
an adapter loads with peft onto that base.

Imports are atomic: a model is built in <root>/.staging/<name>-<random>, validated (config parsed,
architecture supported, every tensor's name and shape checked against the config), and only then
renamed to <root>/<name>. A failure anywhere removes the staging directory; the store never holds a
half-written model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.store.builtin import BUILTIN
from shared.store.errors import StoreError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,159}$")  # ":" for fine-tunes (ft:base:suffix:job)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
METADATA = "tandem.json"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    num_parameters: int
    dtype: str
    size_bytes: int
    source: str
    created: float
    has_tokenizer: bool
    base_model: str | None = None  # a LoRA fine-tune: the base it applies to (by name, in this store)


class ModelStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def at(cls, root: str | Path | None = None) -> ModelStore:
        """The store at `root`, or the default one ($TANDEM_MODELS) when none is given."""
        from shared import envs

        return cls(Path(root).expanduser() if root else envs.models_dir())

    # -- lookup -------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.root / name

    def has(self, name: str) -> bool:
        return (self.path(name) / METADATA).is_file()

    def get(self, name: str) -> ModelInfo:
        meta = self.path(name) / METADATA
        if not meta.is_file():
            known = ", ".join(m.name for m in self.list()) or "none"
            raise StoreError(f"model '{name}' is not in the store at {self.root} (models: {known})")
        return ModelInfo(**json.loads(meta.read_text()))

    def list(self) -> list[ModelInfo]:
        if not self.root.is_dir():
            return []
        return [self.get(p.name) for p in sorted(self.root.iterdir()) if (p / METADATA).is_file()]

    # -- import -------------------------------------------------------------------------------

    def import_builtin(self, name: str) -> ModelInfo:
        recipe = BUILTIN.get(name)
        if recipe is None:
            raise StoreError(
                f"'{name}' is neither a directory nor a built-in model (built-in: {', '.join(BUILTIN)})"
            )
        from shared.store.gguf_import import import_gguf

        gguf_path = recipe.locate()
        return self._import(
            name, f"gguf:{recipe.pip_name}/{recipe.filename}", lambda d: import_gguf(gguf_path, d)
        )

    def import_gguf(self, path: Path, name: str, keep_quantized: bool = False) -> ModelInfo:
        """A GGUF file's model; `keep_quantized`: its Q4/Q8 integers kept (shared/models/quant.py)."""
        from shared.store.gguf_import import import_gguf

        source = f"gguf:{Path(path).resolve()}" + (":kept" if keep_quantized else "")
        return self._import(name, source, lambda d: import_gguf(Path(path), d, keep_quantized))

    def import_checkpoint(self, src: Path, name: str | None = None) -> ModelInfo:
        src = Path(src)
        if not src.is_dir():
            raise StoreError(f"checkpoint directory not found: {src}")
        return self._import(
            name or src.resolve().name, f"dir:{src.resolve()}", lambda d: _copy_checkpoint(src, d)
        )

    def create(self, name: str, source: str, build: Callable[[Path], None]) -> ModelInfo:
        """A new model written by `build(directory)` (e.g. an upcycled one), checked and added atomically."""
        return self._import(name, source, build)

    def create_adapter(self, name: str, base: str, source: str, build: Callable[[Path], None]) -> ModelInfo:
        """A LoRA fine-tune of `base` (a model in this store): the adapter in the PEFT format plus the
        base's tokenizer files, written by `build(directory)`; checked against the base and added
        atomically. Serving loads the base and merges the adapter."""
        base_info = self.get(base)
        if base_info.base_model:
            raise StoreError(f"'{base}' is itself an adapter; train adapters on a full model")

        def describe(staging: Path) -> ModelInfo:
            import torch

            from shared.models import model_class
            from shared.models.loader import read_config
            from shared.models.lora import adapter_pairs, read_adapter_config

            cfg = read_adapter_config(staging)
            if cfg.get("base_model_name_or_path") != base:
                raise StoreError(
                    f"cannot import '{name}': the adapter names base '{cfg.get('base_model_name_or_path')}'"
                )
            with torch.device("meta"):
                model = model_class(read_config(self.path(base)))(read_config(self.path(base)))
            pairs = adapter_pairs(staging, model)
            size = sum(f.stat().st_size for f in staging.iterdir() if f.is_file())
            return ModelInfo(
                name=name,
                architecture=base_info.architecture,
                num_parameters=sum(a.numel() + b.numel() for _, a, b in pairs),
                dtype=str(pairs[0][1].dtype).removeprefix("torch."),
                size_bytes=size,
                source=source,
                created=time.time(),
                has_tokenizer=(staging / "tokenizer.json").is_file(),
                base_model=base,
            )

        return self._import(name, source, build, describe)

    def remove(self, name: str) -> None:
        self.get(name)
        dependents = [m.name for m in self.list() if m.base_model == name]
        if dependents:
            raise StoreError(f"model '{name}' is the base of {', '.join(dependents)}; remove those first")
        shutil.rmtree(self.path(name))

    def _import(self, name: str, source: str, build: Callable[[Path], None], describe=None) -> ModelInfo:
        # (importing needs the model code and torch; finding models does not)
        from shared.models.config import ConfigError
        from shared.models.loader import WeightError, check_checkpoint
        from shared.models.lora import AdapterError

        if not _NAME.match(name):
            raise StoreError(f"invalid model name '{name}': use letters, digits, '.', '_', '-' and ':'")
        if self.path(name).exists():
            raise StoreError(f"model '{name}' already exists in the store at {self.root}")
        with self._staging(name) as staging:
            build(staging)
            try:
                if describe is not None:
                    info = describe(staging)
                else:
                    cfg = check_checkpoint(staging)
                    info = _describe(staging, name, cfg.architecture, source)
            except (ConfigError, WeightError, AdapterError) as e:
                raise StoreError(f"cannot import '{name}': {e}") from e
            (staging / METADATA).write_text(json.dumps(asdict(info), indent=2))
            _fsync_tree(staging)  # the files are on disk before the rename makes them the model
            staging.rename(self.path(name))
            _fsync(self.root)  # and the rename itself survives a crash
        return info

    @contextmanager
    def _staging(self, name: str) -> Iterator[Path]:
        area = self.root / ".staging"
        area.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=area))
        staging.chmod(0o755)  # mkdtemp makes it private; the store is shared by the platform's services
        try:
            yield staging
        finally:
            if staging.exists():  # still here: the import failed before the final rename
                shutil.rmtree(staging, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # (Linux flushes through a read-only descriptor too)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then the directories that name them."""
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
        if not path.is_symlink():
            _fsync(path)
    _fsync(root)


def _copy_checkpoint(src: Path, dst: Path) -> None:
    from shared.models.loader import WeightError, checkpoint_files

    if not (src / "config.json").is_file():
        raise StoreError(f"{src}: config.json is missing")
    try:
        files = set(checkpoint_files(src).values())
    except WeightError as e:
        raise StoreError(str(e)) from e
    index = src / "model.safetensors.index.json"
    to_copy = [src / "config.json", *sorted(files), *([index] if index.is_file() else [])]
    to_copy += [src / f for f in _TOKENIZER_FILES if (src / f).is_file()]
    for f in to_copy:
        shutil.copy2(f, dst / f.name)


def _describe(path: Path, name: str, architecture: str, source: str) -> ModelInfo:
    from safetensors import safe_open

    from shared.models.loader import checkpoint_files

    params, dtypes = 0, Counter()
    for file in set(checkpoint_files(path).values()):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= d
                params += n
                dtypes[str(sl.get_dtype()).lower()] += n
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return ModelInfo(
        name=name,
        architecture=architecture,
        num_parameters=params,
        dtype=dtypes.most_common(1)[0][0] if dtypes else "unknown",
        size_bytes=size,
        source=source,
        created=time.time(),
        has_tokenizer=(path / "tokenizer.json").is_file(),
    )
