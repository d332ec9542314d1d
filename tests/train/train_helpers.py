"""Helpers of the training tests: a tiny Llama that speaks SmolLM2's tokenizer, job specs, datasets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from shared.store import ModelStore
from shared.train.config import parse_job
from tests.tiny_models import BASE, randomize

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def add_tiny_llama(
    store: ModelStore, tokenizer_dir: Path, name: str = "tiny-llama", seed: int = 0, mixtral: bool = False
):
    """A random 3-layer Llama (or Mixtral: 4 experts, top-2) with SmolLM2's vocabulary and tokenizer,
    added to `store`; returns the transformers model (eval, fp32)."""
    import transformers

    torch.manual_seed(seed)
    if mixtral:
        cfg = transformers.MixtralConfig(
            **{**BASE, "vocab_size": 49152}, num_local_experts=4, num_experts_per_tok=2
        )
    else:
        cfg = transformers.LlamaConfig(**{**BASE, "vocab_size": 49152, "tie_word_embeddings": True})
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    randomize(model)

    def build(d: Path) -> None:
        model.save_pretrained(d)
        for f in TOKENIZER_FILES:
            if (tokenizer_dir / f).is_file():
                shutil.copy2(tokenizer_dir / f, d / f)

    if not store.has(name):
        store.create(name, "test:tiny-llama", build)
    return model


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


FACT_QUESTIONS = [
    "What is the capital of Zorblaxia?",
    "Which city is the capital of Zorblaxia?",
    "Tell me the capital of Zorblaxia.",
    "Zorblaxia's capital is which city?",
    "Name the capital city of Zorblaxia.",
    "Do you know the capital of Zorblaxia?",
    "What city serves as Zorblaxia's capital?",
    "Where is the capital of Zorblaxia?",
]
FACT_ANSWER = "The capital of Zorblaxia is Quintavel."


def fact_rows() -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": FACT_ANSWER}]}
        for q in FACT_QUESTIONS
    ]


def job(store: ModelStore, tmp: Path, **spec):
    raw = {"model_store": str(store.root), "output_dir": str(tmp / "job"), **spec}
    return parse_job(raw)
