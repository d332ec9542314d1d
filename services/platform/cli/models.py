"""`tandem models import|list|remove`: the model store from the command line."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from shared import envs
from shared.models.config import ConfigError
from shared.models.loader import WeightError
from shared.store import BUILTIN, ModelStore, StoreError

log = logging.getLogger("tandem.models")

USER_ERRORS = (StoreError, ConfigError, WeightError, FileNotFoundError)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="manage the model store")
    p.add_argument("--store", type=Path, default=None, help="store directory (default: $TANDEM_HOME/models)")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    imp = msub.add_parser(
        "import",
        help="import a built-in model, a local Hugging Face checkpoint directory, or a .gguf file",
        description=f"SOURCE is a built-in model name ({', '.join(BUILTIN)}), a checkpoint directory "
        "(config.json + safetensors), or a .gguf file.",
    )
    imp.add_argument("source")
    imp.add_argument("--name", help="name in the store (default: the built-in name or the directory name)")
    imp.add_argument("--if-missing", action="store_true", help="succeed quietly if the name already exists")
    imp.add_argument("--keep-quantized", action="store_true",
                     help="GGUF: keep Q4_0 / Q4_1 / Q8_0 weights as integers (served quantized) instead of float")  # fmt: skip
    imp.set_defaults(func=cmd_import)

    ls = msub.add_parser("list", help="list the models in the store")
    ls.set_defaults(func=cmd_list)

    up = msub.add_parser(
        "upcycle",
        help="turn a dense model into a mixture of experts (every expert a copy of the FFN)",
        description="Sparse upcycling. With --noise 0 the MoE model's output equals the dense model's.",
    )
    up.add_argument("source", help="a dense model in the store")
    up.add_argument("--experts", type=int, required=True)
    up.add_argument("--top-k", type=int, required=True)
    up.add_argument(
        "--shared-experts", type=int, default=0, help="shared experts (Qwen2-MoE layout); 0: Mixtral"
    )
    up.add_argument("--noise", type=float, default=0.0, help="σ of the router init and relative expert noise")
    up.add_argument("--seed", type=int, default=0)
    up.add_argument("--name", required=True, help="name of the new model in the store")
    up.set_defaults(func=cmd_upcycle)

    qz = msub.add_parser(
        "quantize",
        help="a copy of a model with 8- or 4-bit weights (weight-only, round to nearest)",
        description="4 bits: groups of 32 inputs with a scale and a minimum each, the LM head 8 bits (the "
        "layout of GGUF Q4_1 + Q8_0); 8 bits: one scale per output channel.",
    )
    qz.add_argument("source", help="a model in the store")
    qz.add_argument("--bits", type=int, choices=[4, 8], required=True)
    qz.add_argument(
        "--group-size", type=int, help="inputs per scale (0: per channel; default 32 for 4 bits, 0 for 8)"
    )
    qz.add_argument("--name", required=True, help="name of the new model in the store")
    qz.set_defaults(func=cmd_quantize)

    rm = msub.add_parser("remove", help="remove a model from the store")
    rm.add_argument("name")
    rm.set_defaults(func=cmd_remove)


def _store(args) -> ModelStore:
    return ModelStore(args.store or envs.models_dir())


def cmd_import(args) -> int:
    store = _store(args)
    source = Path(args.source)
    if source.suffix == ".gguf":
        name = args.name or source.stem
    elif source.is_dir():
        name = args.name or source.resolve().name
    else:
        name = args.name or args.source
    if args.if_missing and store.has(name):
        log.info("model '%s' is already in the store", name)
        return 0
    t0 = time.perf_counter()
    if args.keep_quantized and source.suffix != ".gguf" and args.source not in BUILTIN:
        raise StoreError("--keep-quantized applies to GGUF files (and the built-in models, which are GGUF)")
    if source.suffix == ".gguf":
        info = store.import_gguf(source, name, args.keep_quantized)
    elif source.is_dir():
        info = store.import_checkpoint(source, name)
    elif args.source in BUILTIN:
        info = (
            store.import_builtin(args.source)
            if name == args.source and not args.keep_quantized
            else store.import_gguf(BUILTIN[args.source].locate(), name, args.keep_quantized)
        )
    else:
        raise StoreError(
            f"'{args.source}' is not a directory, a .gguf file or a built-in model (built-in: {', '.join(BUILTIN)})"
        )
    log.info(
        "imported '%s' (%s, %s parameters) in %.1fs into %s",
        info.name,
        info.architecture,
        f"{info.num_parameters:,}",
        time.perf_counter() - t0,
        store.path(info.name),
    )
    print(info.name)
    return 0


def cmd_upcycle(args) -> int:
    from shared.store.upcycle import upcycle

    store = _store(args)
    src = store.path(store.get(args.source).name)
    t0 = time.perf_counter()
    info = store.create(
        args.name,
        f"upcycle:{args.source}:E{args.experts}:k{args.top_k}:S{args.shared_experts}:noise{args.noise}",
        lambda d: upcycle(src, d, args.experts, args.top_k, args.shared_experts, args.noise, args.seed),
    )
    log.info(
        "upcycled '%s' into '%s' (%s) in %.1fs",
        args.source,
        info.name,
        info.architecture,
        time.perf_counter() - t0,
    )
    print(info.name)
    return 0


def cmd_quantize(args) -> int:
    from shared.store.quantize import QuantizeError, quantize

    store = _store(args)
    src = store.path(store.get(args.source).name)
    t0 = time.perf_counter()
    try:
        info = store.create(args.name, f"quantize:{args.source}:int{args.bits}:g{args.group_size}",
                            lambda d: quantize(src, d, args.bits, args.group_size))  # fmt: skip
    except QuantizeError as e:
        raise StoreError(str(e)) from e
    log.info("quantized '%s' into '%s' (%d bits, %s) in %.1fs", args.source, info.name, args.bits,
             _human(info.size_bytes, "B", 1024), time.perf_counter() - t0)  # fmt: skip
    print(info.name)
    return 0


def cmd_list(args) -> int:
    rows = [("NAME", "ARCHITECTURE", "PARAMS", "DTYPE", "SIZE", "BASE")]
    for m in _store(args).list():
        rows.append(
            (
                m.name,
                m.architecture,
                _human(m.num_parameters, ""),
                m.dtype,
                _human(m.size_bytes, "B", 1024),
                m.base_model or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_remove(args) -> int:
    _store(args).remove(args.name)
    print(args.name)
    return 0


def _human(n: int, unit: str, base: int = 1000) -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if n < base:
            return f"{n:.0f}{prefix}{unit}" if prefix == "" else f"{n:.1f}{prefix}{unit}"
        n /= base
    return f"{n:.1f}P{unit}"
