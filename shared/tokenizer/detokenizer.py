"""IncrementalDetokenizer: a request's output tokens become text as they arrive.

  detok = IncrementalDetokenizer(tokenizer, prompt_ids, params)
  stop = detok.update(new_token_ids, stop_terminated)   # a stop string, if one completed
  delta = detok.next_text(finished)                       # text safe to stream now

Decoding uses the `tokenizers` DecodeStream, seeded with the tail of the prompt so the first output
token decodes in context (a leading space, a byte sequence begun in the prompt). It yields text only
once a token completes a character, so a stream never splits a multi-byte character.

Stop strings are searched in the decoded text, so they match across token boundaries. While a
request runs, the last (longest stop string - 1) characters are held back — they might be the start
of a stop string — unless the stop string is to be included in the output anyway. The text ends
before the stop string, or after it with `include_stop_str_in_output`. The EOS / stop token that
ended a request adds no text unless `include_stop_str_in_output` (as in vLLM).
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from shared.core.sampling_params import SamplingParams
from shared.tokenizer.tokenizer import Tokenizer

#: prompt tokens given to the decoder as context
PROMPT_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in params.stop if s)
        self.include_stop = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self.stream = DecodeStream(
            ids=list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]),
            skip_special_tokens=params.skip_special_tokens,
        )
        self.text = ""
        self.num_tokens = 0
        self.sent = 0  # characters of `text` already returned by next_text
        self.hold_back = max((len(s) for s in self.stop), default=1) - 1 if not self.include_stop else 0
        self.stopped = False

    def update(self, new_token_ids: list[int], stop_terminated: bool = False) -> str | None:
        """Decode new tokens. stop_terminated: the last token is the EOS / stop token that ended the
        request. Returns the stop string that completed, if any (the text is then cut there)."""
        if self.stopped:
            return None
        ids = new_token_ids
        if stop_terminated and not self.include_stop:
            ids = ids[:-1]
        before = len(self.text)
        for token in ids:
            self.num_tokens += 1
            piece = self.stream.step(self.tokenizer.backend, token)
            if piece:
                self.text += piece
        if not self.stop or self.num_tokens < self.min_tokens or len(self.text) == before:
            return None
        return self._find_stop(before)

    def _find_stop(self, before: int) -> str | None:
        best: tuple[int, str] | None = None
        for s in self.stop:
            at = self.text.find(s, max(0, before - len(s) + 1))
            if at != -1 and (best is None or at < best[0]):
                best = (at, s)
        if best is None:
            return None
        at, s = best
        self.text = self.text[: at + len(s)] if self.include_stop else self.text[:at]
        self.stopped = True
        return s

    def next_text(self, finished: bool) -> str:
        """Text not yet returned that can no longer change (all of it once the request finished)."""
        end = len(self.text) if finished or self.stopped else max(self.sent, len(self.text) - self.hold_back)
        delta = self.text[self.sent : end]
        self.sent = end
        return delta
