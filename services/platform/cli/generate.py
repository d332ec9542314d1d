"""`tandem generate`: one prompt through the engine, in this process (no services needed).

stdout carries only the generated text (or, with --json, one JSON object with text and token ids);
logs go to stderr. The sampling flags and the engine setup are shared with `tandem chat`.
"""

from __future__ import annotations

import argparse
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


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--ignore-eos", action="store_true")


def sampling_params(args, vocab_size: int) -> SamplingParams:
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        stop=tuple(args.stop),
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
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
