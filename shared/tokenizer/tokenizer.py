"""Tokenizer: a model's own tokenizer (Rust `tokenizers`) plus its special tokens and chat template,
read from a store directory (tokenizer.json + tokenizer_config.json).

Whether BOS is prepended is the tokenizer.json post-processor's business (Llama 3 adds one, SmolLM2
does not), so `encode(add_special_tokens=True)` matches transformers for either. A chat prompt is
rendered by the template (which writes its own special tokens) and encoded without adding more.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _RustTokenizer

from shared.tokenizer.chat_template import ChatTemplateError, render_chat, with_tools


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config.json files
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, backend: _RustTokenizer, config: dict, generation: dict | None = None):
        self.backend = backend
        self.config = config
        self.chat_template: str | None = config.get("chat_template")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token"))
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.special_ids = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        )
        eos = (generation or {}).get("eos_token_id", self.eos_token_id)
        #: token ids that end generation (generation_config.json may list several)
        self.stop_token_ids: tuple[int, ...] = tuple(
            i for i in (eos if isinstance(eos, list) else [eos]) if i is not None
        )

    @classmethod
    def from_dir(cls, path: Path) -> Tokenizer:
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{path}: tokenizer.json is missing (this model has no tokenizer)")
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        template_file = path / "chat_template.jinja"
        if template_file.is_file():
            config["chat_template"] = template_file.read_text()
        gen_file = path / "generation_config.json"
        generation = json.loads(gen_file.read_text()) if gen_file.is_file() else None
        return cls(_RustTokenizer.from_file(str(tok_file)), config, generation)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` (no special tokens added) and each token's [start, end) character span."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **variables,
    ) -> str:
        """The prompt text of a conversation; `tools` (OpenAI's list) through the template's own
        `tools` variable, or a tool prompt when it has none (chat_template.with_tools)."""
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template")
        messages, extra = with_tools(self.chat_template, messages, tools)
        variables.update(extra)
        return render_chat(
            self.chat_template,
            messages,
            add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **variables,
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> list[int]:
        text = self.apply_chat_template(messages, add_generation_prompt, **variables)
        return self.encode(text, add_special_tokens=False)
