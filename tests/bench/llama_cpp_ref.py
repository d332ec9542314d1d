"""llama.cpp as a benchmark baseline, through llama-cpp-python's C API (not a Tandem dependency).

    ref = LlamaCpp.load(gguf, threads=2, max_seqs=32, max_len=176)   # None where not installed
    ref.generate([[ids...], ...], new_tokens=128)                     # greedy, EOS ignored

It decodes the way llama.cpp's own server runs parallel slots: every sequence's next token in one
llama_decode batch, one KV stream per sequence, greedy sampling in C, and a sequence's KV reused
for the prefix it shares with the last call (the server's prompt cache; Tandem's prefix cache does
the same on its side). Prompts are token ids, so both engines see the same input.

Installing it compiles llama.cpp from source (about 8 minutes on two cores): the command is in
docs/benchmarks.md, "Quantized weights".
"""

from __future__ import annotations

import ctypes
from pathlib import Path


class LlamaCpp:
    def __init__(self, llama_cpp, gguf: Path, threads: int, max_seqs: int, max_len: int):
        self.api = api = llama_cpp
        api.llama_backend_init()
        api.llama_log_set(_quiet, ctypes.c_void_p(0))
        model_params = api.llama_model_default_params()
        # ggml's AMX kernels (its only extra buffer type for Q4_1 on x86) segfault in
        # ggml_backend_amx_mul_mat on the AMX VMs this was tried on; without them Q4_1 runs ggml's AVX-512
        # VNNI dot products, as on any AVX-512 CPU
        model_params.use_extra_bufts = not _has_amx()
        self.model = api.llama_model_load_from_file(str(gguf).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        params = api.llama_context_default_params()
        params.n_seq_max = max_seqs
        params.n_ctx = max_seqs * max_len  # one stream per sequence: each gets n_ctx / n_seq_max
        params.n_batch = params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = threads
        self.ctx = api.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.max_seqs, self.max_len = max_seqs, max_len
        self.batch = api.llama_batch_init(512, 0, 1)
        self.sampler = api.llama_sampler_init_greedy()
        self.cached: list[list[int]] = [[] for _ in range(max_seqs)]  # the tokens in each sequence's KV

    @classmethod
    def load(cls, gguf: Path, threads: int, max_seqs: int, max_len: int) -> LlamaCpp | None:
        try:
            import llama_cpp
        except ImportError:
            return None
        return cls(llama_cpp, gguf, threads, max_seqs, max_len)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) entries."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        if (rc := self.api.llama_decode(self.ctx, b)) != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Greedy continuations of each prompt, new_tokens each (EOS ignored). Like Tandem's prefix
        cache (and llama.cpp server's cache_prompt), a sequence keeps the KV of the tokens it shares
        with the previous call's sequence of the same index; the prompt's last token always runs."""
        if len(prompts) > self.max_seqs or max(map(len, prompts)) + new_tokens > self.max_len:
            raise ValueError("more sequences or tokens than the context was made for")
        api = self.api
        memory = api.llama_get_memory(self.ctx)
        keep = []
        for s in range(self.max_seqs):
            had = self.cached[s]
            n = 0
            if s < len(prompts):
                limit = min(len(had), len(prompts[s]) - 1)
                while n < limit and had[n] == prompts[s][n]:
                    n += 1
            api.llama_memory_seq_rm(memory, s, n, -1)
            self.cached[s] = had[:n]
            keep.append(n)
        outputs: list[list[int]] = [[] for _ in prompts]
        # the rest of the prompts, packed into batches of up to 512 tokens; a sequence's first token
        # comes from the batch holding its prompt's last token
        flat = [(p[i], i, s, i == len(p) - 1) for s, p in enumerate(prompts) for i in range(keep[s], len(p))]
        for start in range(0, len(flat), 512):
            chunk = flat[start : start + 512]
            self._decode(chunk)
            for i, (_, _, s, ends) in enumerate(chunk):
                if ends:
                    outputs[s].append(api.llama_sampler_sample(self.sampler, self.ctx, i))
        for step in range(1, new_tokens):
            self._decode(
                [
                    (out[-1], len(p) + step - 1, s, True)
                    for s, (p, out) in enumerate(zip(prompts, outputs, strict=True))
                ]
            )
            for s, out in enumerate(outputs):
                out.append(api.llama_sampler_sample(self.sampler, self.ctx, s))
        for s, (p, out) in enumerate(zip(prompts, outputs, strict=True)):
            self.cached[s] = p + out[:-1]  # what the KV holds now
        return outputs

    def close(self) -> None:
        api = self.api
        api.llama_sampler_free(self.sampler)
        api.llama_batch_free(self.batch)
        api.llama_free(self.ctx)
        api.llama_model_free(self.model)


def _quiet_log(level, text, user_data):  # llama.cpp's log callback: keep the bench's output clean
    return None


try:
    import llama_cpp as _api

    _quiet = _api.llama_log_callback(_quiet_log)
except ImportError:  # not installed: LlamaCpp.load returns None before _quiet is needed
    _quiet = None


def _has_amx() -> bool:
    try:
        return " amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
