"""Structured output: a request whose SamplingParams carry a `grammar` only ever samples tokens that
keep its output inside that grammar.

The grammar is llguidance's (a Lark grammar, or the JSON form `grammar_from_json_schema` makes from a
JSON schema; the gateway builds them from OpenAI's response_format and tools). Each such
request holds an `LLMatcher`: before sampling, the matcher's bitmask of allowed next tokens sets
every other logit to -inf (after penalties and biases, so nothing re-enables them); after sampling,
the token is consumed. When the grammar is complete only EOS is allowed, so the request stops there.
Rows without a grammar are untouched, so constrained and free requests share batches.

The matcher follows the request's output, which the engine keeps across preemption (recompute), and
a decode that continues a handoff consumes the prefill's first token first.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("tandem.engine")


class GrammarCompiler:
    """Builds matchers for one model's tokenizer (its llguidance view is made once, ~1 s, on the
    first grammar request)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: tuple[int, ...]):
        import llguidance

        self._ll = llguidance
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(
            tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids) or None
        )

    def matcher(self, grammar: str):
        """A fresh matcher; ValueError (naming `grammar`) for a grammar llguidance refuses."""
        ok, warnings_or_error = _validate(self._ll, grammar, self.tokenizer)
        if not ok:
            raise ValueError(f"grammar is not valid: {warnings_or_error}")
        m = self._ll.LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            raise ValueError(f"grammar is not valid: {m.get_error()}")
        return m


def _validate(ll, grammar: str, tokenizer) -> tuple[bool, str]:
    try:
        is_error, messages = ll.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    except (ValueError, TypeError) as e:
        return False, str(e)
    return not is_error, "; ".join(messages)


def apply_masks(logits: torch.Tensor, rows: list[tuple[int, object]]) -> None:
    """For each (row, matcher): set the logits of tokens the matcher does not allow to -inf."""
    if not rows:
        return
    vocab = logits.shape[1]
    words = (vocab + 31) // 32
    packed = torch.empty((len(rows), words), dtype=torch.int32)
    for j, (_, m) in enumerate(rows):
        mask = m.compute_bitmask()  # little-endian int32 words, bit i of word w: token 32 w + i
        packed[j] = torch.frombuffer(bytearray(mask), dtype=torch.int32)[:words]
    packed = packed.to(logits.device)
    bits = torch.bitwise_left_shift(torch.ones(32, dtype=torch.int32, device=logits.device),
                                    torch.arange(32, dtype=torch.int32, device=logits.device))  # fmt: skip
    allowed = (packed[:, :, None] & bits) != 0  # [n, words, 32]
    allowed = allowed.reshape(len(rows), words * 32)[:, :vocab]
    index = torch.tensor([i for i, _ in rows], device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


def consume(matcher, token: int) -> None:
    """Advance the matcher by a sampled token (one outside the mask, e.g. a forced first token of a
    handoff that does not fit, puts it in an error state, which is logged)."""
    if not matcher.consume_token(token) and matcher.is_error():
        log.warning("structured output: token %d rejected: %s", token, matcher.get_error())
