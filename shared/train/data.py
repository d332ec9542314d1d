"""Training data: JSONL files validated line by line, tokenized into loss-masked sequences, batched flat.

Formats (one JSON object per line, OpenAI's fine-tuning formats for sft and dpo):
  pretrain  {"text": "..."}
  sft       {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "...", "weight": 0|1}, ...]}
  dpo       {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": "..."}],
             "non_preferred_output": [{"role": "assistant", "content": "..."}]}

Every problem is a DatasetError naming the file and line, raised while preparing, before any compute.

A `Sequence` is token ids plus `targets`: targets[j] means token j is predicted (from token j - 1) and
counted in the loss. SFT targets the assistant turns' tokens (through the end-of-turn token), found by
rendering the chat template up to each turn and mapping the character spans onto the tokens of the
whole rendered conversation, so training sees exactly the tokens serving produces. An `Example` is one
row of a batch: pretraining packs several documents into one row, each its own `Sequence`, so a
document never attends to another (VarlenAttention keeps sequences apart and positions restart at
0); a DPO example is the pair (chosen, rejected).

`collate(examples)` flattens rows into one token batch, the shape the model's forward takes:

    input_ids  [T]   all sequences back to back          positions [T]  restart at 0 per sequence
    pred_rows  [N]   rows whose next token is a target    labels    [N]  those targets
    label_seq  [N]   which sequence each label belongs to (DPO sums log-probs per sequence)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.tokenizer import Tokenizer
from shared.tokenizer.chat_template import ChatTemplateError

ROLES = ("system", "user", "assistant", "tool")


class DatasetError(ValueError):
    """A training file that cannot be used, with the file and line at fault."""


@dataclass(frozen=True)
class Sequence:
    tokens: tuple[int, ...]
    targets: tuple[bool, ...]

    @property
    def num_targets(self) -> int:
        return sum(self.targets)


@dataclass(frozen=True)
class Example:
    segments: tuple[Sequence, ...]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.segments)

    @property
    def num_targets(self) -> int:
        return sum(s.num_targets for s in self.segments)


# -- reading and validating ------------------------------------------------------------------------


def read_jsonl(path: Path, name: str | None = None) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; malformed lines and empty files are errors,
    reported against `name` (default: the path)."""
    path = Path(path)
    shown = name or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{shown}: training file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{shown}: cannot read ({e})") from e
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{shown}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DatasetError(f"{shown}:{lineno}: each line must be a JSON object, got {type(obj).__name__}")
        rows.append((lineno, obj))
    if not rows:
        raise DatasetError(f"{shown}: the training file is empty")
    return rows


def _check_messages(messages, where: str, field: str = "messages") -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: '{field}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        at = f"{where}: {field}[{i}]"
        if not isinstance(m, dict):
            raise DatasetError(f"{at} must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DatasetError(f"{at}.role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise DatasetError(f"{at}.content must be a string")
        weight = m.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise DatasetError(f"{at}.weight must be 0 or 1, got {weight!r}")
        if "weight" in m and role != "assistant":
            raise DatasetError(f"{at}.weight is only allowed on assistant messages")
        out.append({"role": role, "content": content, "weight": weight})
    return out


def _check_output(value, where: str, field: str) -> dict:
    if not isinstance(value, list) or len(value) != 1:
        raise DatasetError(f"{where}: '{field}' must be a list holding one assistant message")
    (m,) = _check_messages(value, where, field)
    if m["role"] != "assistant":
        raise DatasetError(f"{where}: {field}[0].role must be 'assistant', got '{m['role']}'")
    return m


FORMATS = {"sft": "messages", "dpo": "preferred_output", "pretrain": "text"}


def sniff_format(path: Path, name: str | None = None) -> tuple[str, int]:
    """(format, number of examples) of a training file, checking every line's schema without a
    tokenizer (what an upload can check before any model is named). Errors read `name:line: ...`."""
    rows = read_jsonl(path, name)
    shown = name or str(path)
    first = rows[0][1]
    fmt = next((f for f, key in FORMATS.items() if key in first), None)
    if fmt is None:
        raise DatasetError(
            f"{shown}:{rows[0][0]}: a line needs 'messages' (SFT), 'input' + 'preferred_output' + "
            "'non_preferred_output' (DPO) or 'text' (pretraining)"
        )
    for lineno, obj in rows:
        where = f"{shown}:{lineno}"
        if FORMATS[fmt] not in obj:
            raise DatasetError(
                f"{where}: every line must have the first line's format ({fmt}: '{FORMATS[fmt]}')"
            )
        if fmt == "sft":
            messages = _check_messages(obj["messages"], where)
            if not any(m["role"] == "assistant" and m["weight"] for m in messages):
                raise DatasetError(f"{where}: the conversation has no assistant turn to learn from")
        elif fmt == "dpo":
            for key in ("input", "non_preferred_output"):
                if key not in obj:
                    raise DatasetError(
                        f"{where}: a DPO line needs '{key}' (OpenAI preference fine-tuning format)"
                    )
            if not isinstance(obj["input"], dict):
                raise DatasetError(f"{where}: 'input' must be an object with 'messages'")
            _check_messages(obj["input"].get("messages"), where, "input.messages")
            _check_output(obj["preferred_output"], where, "preferred_output")
            _check_output(obj["non_preferred_output"], where, "non_preferred_output")
        elif not isinstance(obj["text"], str) or not obj["text"]:
            raise DatasetError(f"{where}: a pretraining line needs a non-empty string 'text'")
    return fmt, len(rows)


# -- tokenizing -------------------------------------------------------------------------------------


def _render(tok: Tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tok.apply_chat_template(plain, add_generation_prompt=generation_prompt)


def chat_sequence(tok: Tokenizer, messages: list[dict], where: str, max_len: int) -> Sequence:
    """The templated conversation with targets on the assistant turns whose weight is 1."""
    try:
        full = _render(tok, messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or m["weight"] == 0:
                continue
            if i == 0:
                raise DatasetError(
                    f"{where}: the conversation starts with an assistant turn (nothing to answer)"
                )
            start = _render(tok, messages[:i], True)
            end = _render(tok, messages[: i + 1], False).rstrip()
            if not (full.startswith(end) and end.startswith(start)):
                raise DatasetError(
                    f"{where}: the model's chat template does not render conversations prefix by prefix, "
                    "so assistant turns cannot be located"
                )
            spans.append((len(start), len(end)))
    except ChatTemplateError as e:
        raise DatasetError(f"{where}: chat template failed: {e}") from e
    if not spans:
        raise DatasetError(f"{where}: the conversation has no assistant turn to learn from")
    ids, offsets = tok.encode_with_offsets(full)
    targets = [any(s <= a < e for s, e in spans) for a, _ in offsets]
    ids, targets = ids[:max_len], targets[:max_len]
    targets[0] = False  # the first token is never predicted
    if not any(targets):
        raise DatasetError(f"{where}: every assistant token lies beyond max_seq_len ({max_len})")
    return Sequence(tuple(ids), tuple(targets))


def document_sequences(tok: Tokenizer, text: str, max_len: int) -> list[Sequence]:
    """A document (plus EOS) in chunks of at most max_len tokens; every token but a chunk's first is a target."""
    ids = tok.encode(text, add_special_tokens=True)
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    chunks = [ids[i : i + max_len] for i in range(0, len(ids), max_len)]
    return [Sequence(tuple(c), (False,) + (True,) * (len(c) - 1)) for c in chunks if len(c) > 1]


def pack(sequences: list[Sequence], max_len: int) -> list[Example]:
    """Greedy, in order: consecutive sequences share a row while the row stays within max_len tokens."""
    rows: list[list[Sequence]] = []
    used = max_len
    for seq in sequences:
        if used + len(seq.tokens) > max_len:
            rows.append([])
            used = 0
        rows[-1].append(seq)
        used += len(seq.tokens)
    return [Example(tuple(r)) for r in rows]


def load_dataset(path: Path, objective: str, tok: Tokenizer, max_len: int) -> list[Example]:
    """Validate and tokenize a whole training file; any bad line raises before anything is returned."""
    path = Path(path)
    rows = read_jsonl(path)
    if objective == "pretrain":
        docs: list[Sequence] = []
        for lineno, obj in rows:
            text = obj.get("text")
            if not isinstance(text, str) or not text:
                raise DatasetError(f"{path}:{lineno}: a pretraining line needs a non-empty string 'text'")
            docs.extend(document_sequences(tok, text, max_len))
        return pack(docs, max_len)
    examples = []
    for lineno, obj in rows:
        where = f"{path}:{lineno}"
        if objective == "sft":
            if "messages" not in obj:
                raise DatasetError(f"{where}: an SFT line needs 'messages' (OpenAI chat fine-tuning format)")
            messages = _check_messages(obj["messages"], where)
            examples.append(Example((chat_sequence(tok, messages, where, max_len),)))
        elif objective == "dpo":
            examples.append(_preference_example(tok, obj, where, max_len))
        else:
            raise DatasetError(f"unknown objective '{objective}'")
    return examples


def _preference_example(tok: Tokenizer, obj: dict, where: str, max_len: int) -> Example:
    for key in ("input", "preferred_output", "non_preferred_output"):
        if key not in obj:
            raise DatasetError(f"{where}: a DPO line needs '{key}' (OpenAI preference fine-tuning format)")
    if not isinstance(obj["input"], dict):
        raise DatasetError(f"{where}: 'input' must be an object with 'messages'")
    prompt = _check_messages(obj["input"].get("messages"), where, "input.messages")
    if prompt[-1]["role"] == "assistant":
        raise DatasetError(
            f"{where}: input.messages must end with a user (or tool) turn, not the assistant's"
        )
    prompt = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in prompt]
    chosen = _check_output(obj["preferred_output"], where, "preferred_output")
    rejected = _check_output(obj["non_preferred_output"], where, "non_preferred_output")
    return Example(
        (
            chat_sequence(tok, [*prompt, {**chosen, "weight": 1}], where, max_len),
            chat_sequence(tok, [*prompt, {**rejected, "weight": 1}], where, max_len),
        )
    )


# -- batching ---------------------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    seq_lens: list[int]
    pred_rows: torch.Tensor  # [N]
    labels: torch.Tensor  # [N]
    label_seq: torch.Tensor  # [N]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.positions.to(device),
            self.seq_lens,
            self.pred_rows.to(device),
            self.labels.to(device),
            self.label_seq.to(device),
        )


def collate(examples: list[Example]) -> Batch:
    ids: list[int] = []
    positions: list[int] = []
    seq_lens: list[int] = []
    pred_rows: list[int] = []
    labels: list[int] = []
    label_seq: list[int] = []
    for seq in (s for ex in examples for s in ex.segments):
        base = len(ids)
        for j, (token, is_target) in enumerate(zip(seq.tokens, seq.targets, strict=True)):
            if is_target and j > 0:
                pred_rows.append(base + j - 1)
                labels.append(token)
                label_seq.append(len(seq_lens))
        ids.extend(seq.tokens)
        positions.extend(range(len(seq.tokens)))
        seq_lens.append(len(seq.tokens))
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return Batch(
        as_long(ids), as_long(positions), seq_lens, as_long(pred_rows), as_long(labels), as_long(label_seq)
    )


@dataclass(frozen=True)
class BatchPlan:
    """Which examples each optimizer step uses, and how a worker splits its share into micro-batches.

    Each epoch is a seeded permutation of the examples, cut into global batches of batch_size (a
    final partial batch is dropped). Worker r of W takes every W-th example of the global batch,
    then cuts its share into micro-batches. Any step's examples follow from (seed, step) alone, so a
    resumed run sees exactly the data the uninterrupted run would have.
    """

    num_examples: int
    batch_size: int
    micro_batch_size: int
    epochs: int
    max_steps: int | None
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    @property
    def total_steps(self) -> int:
        return self.max_steps or self.epochs * self.steps_per_epoch

    def global_indices(self, step: int) -> list[int]:
        epoch, i = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch))
        return order[i * self.batch_size : (i + 1) * self.batch_size].tolist()

    def micro_batches(self, step: int, rank: int, world: int) -> list[list[int]]:
        mine = self.global_indices(step)[rank::world]
        m = self.micro_batch_size
        return [mine[i : i + m] for i in range(0, len(mine), m)]
