"""`tandem generate`: one prompt through the engine, in this process (no services needed).

stdout carries only the generated text (or, with --json, one JSON object with text and token ids);
logs go to stderr. The sampling flags and the engine setup are shared with `tandem chat`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

from shared import envs
from shared.core.dtypes import DTYPE_NAMES
from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.store import DEFAULT_MODEL, ModelStore


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model name in the store (default: {DEFAULT_MODEL})"
    )
    p.add_argument("--store", type=Path, default=None, help="store directory (default: $TANDEM_HOME/models)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)


#: SamplingParams fields that are not flags (a token -> bias map)
NOT_FLAGS = ("logit_bias",)


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    """One flag per SamplingParams field (--top-k for top_k ...), typed and defaulted by the dataclass;
    repeatable for the tuple fields; --x / --no-x for the booleans."""
    defaults = {"max_tokens": max_tokens, "temperature": temperature}
    for f in dataclasses.fields(SamplingParams):
        if f.name in NOT_FLAGS:
            continue
        flag, default = "--" + f.name.replace("_", "-"), defaults.get(f.name, f.default)
        kind = (
            int
            if "int" in f.type.split("|")[0] or f.type.startswith("tuple[int")
            else str
            if "str" in f.type
            else float
        )
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(f.default, tuple):
            p.add_argument(flag, action="append", type=kind, default=[], help="repeatable")
        else:
            p.add_argument(flag, type=kind, default=default)


def sampling_params(args, vocab_size: int) -> SamplingParams:
    values = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingParams) if f.name not in NOT_FLAGS
    }
    params = SamplingParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    params.validate(vocab_size)
    return params


def load_engine(args) -> LLMEngine:
    torch.set_num_threads(envs.torch_threads(min(2, os.cpu_count() or 1)))
    store = ModelStore(args.store or envs.models_dir())
    info = store.get(args.model)
    engine = LLMEngine.from_store(
        store.path(info.name), EngineConfig(device=args.device, dtype=args.dtype), model_id=info.name
    )
    if engine.tokenizer is None:
        raise ValueError(f"model '{info.name}' has no tokenizer, so it cannot take text prompts")
    return engine


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for one prompt with the engine, in-process")
    add_engine_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    p.add_argument("--system", help="system message (with --chat)")
    add_sampling_args(p, max_tokens=128, temperature=0.0)
    p.add_argument("--json", action="store_true", help="print a JSON object with the text and token ids")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    engine = load_engine(args)
    tok = engine.tokenizer
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt_ids = tok.encode_chat([*messages, {"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tok.encode(args.prompt)
    out = engine.generate([prompt_ids], sampling_params(args, tok.vocab_size))[0]
    if args.json:
        result = {
            "text": out.text,
            "token_ids": out.output_token_ids,
            "prompt_tokens": len(prompt_ids),
            "finish_reason": out.finish_reason,
            "stop_reason": out.stop_reason,
        }
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(out.text)
    return 0
