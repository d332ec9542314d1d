"""LLMEngine: continuous batching over a paged KV cache. `step()` is schedule -> run -> postprocess.

    engine = LLMEngine.from_store(path, EngineConfig())
    outputs = engine.generate([prompt_ids, ...], SamplingParams(max_tokens=64))

or incrementally: add_request(...), then step() until has_unfinished() is False; each step returns
the new tokens (and, with a tokenizer, the new text) of every request that produced one, and
abort(request_id) frees a request's blocks at once.

Three modes, per request:
  monolithic       add_request(id, prompt, params)
  prefill-only     add_request(..., prefill_only=True): finishes after the first token with status
                   "handoff" and a KVHandoff (the prompt's KV blocks, the token, the RNG state)
  decode-from-KV   add_request(..., kv_handoff=handoff): the prompt's KV is written into this
                   engine's cache when the request is admitted, and decoding continues from the
                   first token — the same tokens a monolithic run would give.

Any of them may bring a computed prefix from elsewhere (a KV store): add_request(...,
prefix_kv=payload) with the KV of the prompt's first full blocks; only the rest is computed.
`prompt_keys` names a prompt's blocks and `read_cached(keys)` copies out the longest locally cached
run of them, so a worker can tell what it has and what to fetch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.core.kv_hash import BlockKey, prompt_block_keys
from shared.core.logprobs import TokenLogprob
from shared.core.sampling_params import SamplingParams
from shared.engine import structured
from shared.engine.block_pool import BlockPool
from shared.engine.config import EngineConfig
from shared.engine.kv_cache_manager import KVCacheManager
from shared.engine.kv_transfer import KVHandoff
from shared.engine.model_runner import ModelRunner, kv_bytes_per_token
from shared.engine.request import Request, RequestStatus
from shared.engine.sampler import Sampler
from shared.engine.scheduler import Scheduler, SchedulerConfig
from shared.engine.speculative import SpecConfig, Speculator
from shared.models.loader import load_model
from shared.models.lora import AdapterError, LoraBank
from shared.models.transformer import CausalLM
from shared.tokenizer import Tokenizer
from shared.tokenizer.detokenizer import IncrementalDetokenizer

log = logging.getLogger("tandem.engine")


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    output_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    new_logprobs: list[TokenLogprob]
    new_text: str = ""  # with a tokenizer: text that became final with this output
    text: str = ""  # with a tokenizer: all output text so far
    stop_reason: int | str | None = None  # the stop token id or stop string that finished it
    kv_handoff: KVHandoff | None = None  # prefill-only requests, on their final output
    scheduled_at: float | None = None  # time.monotonic() when the request was first scheduled


class LLMEngine:
    def __init__(
        self,
        model: CausalLM,
        config: EngineConfig,
        model_id: str = "model",
        eos_token_ids=(),
        tokenizer: Tokenizer | None = None,
        draft: CausalLM | None = None,
    ):
        """`draft`: the draft model of speculative decoding's 'draft' method (same vocabulary)."""
        # The engine owns the model from here on: projections are fused for serving.
        self.model = model.eval().fuse_for_inference()
        self.config = config
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        kv_dtype = config.kv_torch_dtype()
        per_block = kv_bytes_per_token(model, kv_dtype) * config.block_size
        num_blocks = config.num_blocks or max(1, config.kv_cache_bytes // per_block)
        # A sequence can never outgrow the cache: clamp the context length to what the pool holds.
        wanted = config.max_model_len or model.config.max_position_embeddings
        self.max_model_len = min(wanted, num_blocks * config.block_size)
        if self.max_model_len < wanted:
            log.warning("context length clamped to %d tokens: the KV cache holds no more", self.max_model_len)
        cfg = model.config
        layout = f"{kv_dtype}/{cfg.num_layers}L/{cfg.num_kv_heads}x{cfg.head_dim}/B{config.block_size}"
        self.layout = layout
        self.pool = BlockPool(num_blocks, config.block_size)
        self.kv = KVCacheManager(self.pool, (model_id, layout), config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.long_prefill_chunk),
            self.kv,
        )
        self.runner = ModelRunner(
            model, num_blocks, config.block_size, kv_dtype, config.cpu_kernels, config.int8_activations
        )
        self.sampler = Sampler(self.runner.kernels)
        self.speculator = Speculator.build(
            SpecConfig(config.speculative, config.num_speculative_tokens, config.prompt_lookup_max,
                       config.prompt_lookup_min, config.speculative_max_rows),
            self.sampler, model.config.vocab_size, draft,
            num_blocks=num_blocks, block_size=config.block_size, dtype=kv_dtype, cpu_kernels=config.cpu_kernels,
            int8_activations=config.int8_activations,
        )  # fmt: skip
        self.loras: OrderedDict[str, Path] = OrderedDict()  # loaded adapters, least recently used first
        self.requests: dict[str, Request] = {}
        self.model_id = model_id
        self.prompt_tokens_computed = 0  # prompt tokens run through the model (not from any cache)
        self._grammars = None  # structured output's GrammarCompiler, made on the first grammar request
        log.info(
            "engine: %d KV blocks of %d tokens (%.0f MiB)",
            num_blocks,
            config.block_size,
            num_blocks * per_block / 2**20,
        )

    @classmethod
    def from_store(
        cls, path: Path, config: EngineConfig | None = None, model_id: str | None = None
    ) -> LLMEngine:
        config = config or EngineConfig()
        path = Path(path).expanduser()
        model = load_model(path, device=config.device, dtype=config.torch_dtype())
        gen_file = path / "generation_config.json"
        eos = json.loads(gen_file.read_text()).get("eos_token_id") if gen_file.is_file() else None
        eos = model.config.eos_token_id if eos is None else eos
        eos_ids = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
        tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
        draft = None
        if config.draft_model:
            draft_path = Path(config.draft_model).expanduser()
            draft = load_model(draft_path, device=config.device, dtype=config.torch_dtype())
            if tokenizer is not None and (draft_path / "tokenizer.json").is_file():
                if Tokenizer.from_dir(draft_path).backend.get_vocab() != tokenizer.backend.get_vocab():
                    raise ValueError(f"draft model {draft_path.name} does not share the model's tokenizer")
        return cls(model, config, model_id or path.name, eos_ids, tokenizer, draft)

    # -- requests -----------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        prefill_only: bool = False,
        kv_handoff: KVHandoff | None = None,
        prefix_kv: torch.Tensor | None = None,
        lora: str | None = None,
    ) -> Request:
        """Queue a request. Raises ValueError, naming the problem, for a request the engine cannot run.
        `lora` names an adapter loaded with add_lora: the request runs base + that adapter."""
        if lora is not None and lora not in self.loras:
            raise ValueError(f"LoRA adapter '{lora}' is not loaded")
        if request_id in self.requests:
            raise ValueError(f"request_id '{request_id}' is already in use")
        params = self._fitted(prompt_token_ids, params)
        self.speculator.check(params)
        if prefill_only and kv_handoff is not None:
            raise ValueError("a request is either prefill-only or continues from imported KV, not both")
        request = Request(request_id, list(prompt_token_ids), params, self.eos_token_ids)
        if params.grammar is not None:
            request.matcher = self._grammar_compiler().matcher(params.grammar)
        request.prefill_only = prefill_only
        request.lora = lora
        if lora is not None:
            self.loras.move_to_end(lora)
        if kv_handoff is not None:
            self._check_handoff(request, kv_handoff)
            request.pending_kv = kv_handoff.payload
            request.num_computed_tokens = kv_handoff.num_tokens
            request.num_cached_tokens = kv_handoff.num_cached_tokens
            request.ever_scheduled = True
            request.output_token_ids.append(kv_handoff.first_token)
            if request.matcher is not None:  # the prefill sampled it inside the grammar
                structured.consume(request.matcher, kv_handoff.first_token)
            if kv_handoff.first_logprob is not None:
                request.output_logprobs.append(kv_handoff.first_logprob)
            request.generator.set_state(kv_handoff.rng_state)
        elif prefix_kv is not None and prefix_kv.shape[0] > 0:
            self._check_prefix(request, prefix_kv)
            request.pending_kv = prefix_kv
            request.num_computed_tokens = prefix_kv.shape[0] * self.config.block_size
        if self.tokenizer is not None:
            request.detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params)
            if kv_handoff is not None:  # its text went out with the prefill's output
                request.detokenizer.update([kv_handoff.first_token])
                request.detokenizer.next_text(finished=False)
        self.requests[request_id] = request
        self.scheduler.add(request)
        return request

    def _fitted(self, prompt_token_ids: list[int], params: SamplingParams) -> SamplingParams:
        """The params, validated, with max_tokens resolved (None: up to the context length), once
        the prompt and its tokens are known to fit the vocabulary, the context and the KV cache."""
        if not prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        vocab = self.model.config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise ValueError(f"prompt contains token ids outside the vocabulary of {vocab}")
        params.validate(vocab)
        if params.max_tokens is None:
            if len(prompt_token_ids) >= self.max_model_len:
                raise ValueError(f"the prompt ({len(prompt_token_ids)} tokens) fills the context length of "
                                 f"{self.max_model_len}")  # fmt: skip
            params = dataclasses.replace(params, max_tokens=self.max_model_len - len(prompt_token_ids))
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                f"exceeds the model's context length of {self.max_model_len}"
            )
        if self.kv.blocks_needed(total) > self.pool.num_blocks:
            raise ValueError(
                f"request needs {self.kv.blocks_needed(total)} KV blocks; the cache has {self.pool.num_blocks}"
            )
        return params

    def _grammar_compiler(self) -> structured.GrammarCompiler:
        if self._grammars is None:
            if self.tokenizer is None:
                raise ValueError(
                    "grammar: structured output needs the model's tokenizer, and this engine has none"
                )
            try:
                self._grammars = structured.GrammarCompiler(
                    self.tokenizer.backend.to_str(), self.model.config.vocab_size, self.eos_token_ids
                )
            except ImportError as e:
                raise ValueError("grammar: structured output needs the llguidance package") from e
        return self._grammars

    def _check_handoff(self, request: Request, handoff: KVHandoff) -> None:
        if handoff.layout != self.layout:
            raise ValueError(f"KV handoff has layout '{handoff.layout}', this engine uses '{self.layout}'")
        if handoff.num_tokens != request.num_prompt_tokens:
            raise ValueError(
                f"KV handoff covers {handoff.num_tokens} tokens, the prompt has {request.num_prompt_tokens}"
            )
        blocks = self.kv.blocks_needed(handoff.num_tokens)
        expected = (blocks, *self.runner.block_shape)
        if tuple(handoff.payload.shape) != expected:
            raise ValueError(
                f"KV handoff payload has shape {tuple(handoff.payload.shape)}, expected {expected}"
            )
        if not 0 <= handoff.first_token < self.model.config.vocab_size:
            raise ValueError(f"KV handoff's first token {handoff.first_token} is outside the vocabulary")

    def _check_prefix(self, request: Request, prefix_kv: torch.Tensor) -> None:
        blocks = prefix_kv.shape[0]
        if blocks * self.config.block_size >= request.num_prompt_tokens:
            raise ValueError(
                f"a prefix of {blocks} blocks covers the whole {request.num_prompt_tokens}-token prompt; "
                "at least its last token must be computed"
            )
        if tuple(prefix_kv.shape[1:]) != self.runner.block_shape:
            raise ValueError(
                f"prefix KV has block shape {tuple(prefix_kv.shape[1:])}, expected {self.runner.block_shape}"
            )

    def prompt_keys(
        self, prompt_token_ids: list[int], cache_salt: str | None = None, lora: str | None = None
    ) -> list[BlockKey]:
        """Chain keys of the prompt's full blocks, as this engine's prefix cache names them."""
        return prompt_block_keys(
            prompt_token_ids, self.config.block_size, self.model_id, self.layout, cache_salt, lora
        )

    # -- LoRA adapters ---------------------------------------------------------------------------

    def add_lora(self, name: str, path: Path) -> None:
        """Load a PEFT LoRA adapter of this engine's model under `name` (a no-op if it is loaded).
        With max_loras loaded, the least recently used one that no live request uses makes room."""
        if name in self.loras:
            self.loras.move_to_end(name)
            return
        if not hasattr(self.runner, "loras"):
            raise ValueError("this engine's runner does not take LoRA adapters (an expert-parallel group)")
        if self.runner.loras is None:
            self.runner.loras = LoraBank(self.model)
        if len(self.loras) >= self.config.max_loras:
            busy = {r.lora for r in self.requests.values()}
            idle = next((n for n in self.loras if n not in busy), None)
            if idle is None:
                raise ValueError(f"all {self.config.max_loras} LoRA adapter slots are in use; retry later")
            self.remove_lora(idle)
        try:
            self.runner.loras.load(name, Path(path))
        except AdapterError as e:
            raise ValueError(str(e)) from e
        self.loras[name] = Path(path)
        log.info("loaded LoRA adapter '%s'", name)

    def remove_lora(self, name: str) -> None:
        if any(r.lora == name for r in self.requests.values()):
            raise ValueError(f"LoRA adapter '{name}' is in use")
        if self.loras.pop(name, None) is not None:
            self.runner.loras.unload(name)
            log.info("unloaded LoRA adapter '%s'", name)

    def cached_prefix_len(self, keys: list[BlockKey]) -> int:
        """How many leading keys this engine's prefix cache holds (a snapshot)."""
        return len(self.pool.lookup(keys)) if self.config.enable_prefix_caching else 0

    def read_cached(self, keys: list[BlockKey]) -> torch.Tensor:
        """A copy of the KV of the longest locally cached run of `keys`: [blocks, *block_shape]. A
        runner that cannot read its blocks back (an expert-parallel group: they live on the shards)
        gives none, so callers take them from the KV store instead."""
        readable = self.config.enable_prefix_caching and getattr(self.runner, "exports_kv", True)
        return self.runner.read_blocks(self.pool.lookup(keys) if readable else [])

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks at once; False if it is unknown or already finished."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        self.speculator.release(request_id)
        return True

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        if self.speculates:
            self.speculator.plan(self.scheduler.running, self.max_model_len)
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        for request, _ in plan.scheduled:
            if request.pending_kv is not None:  # decode-from-KV: the prompt's KV lands on admission
                blocks = request.block_ids[: request.pending_kv.shape[0]]
                self.runner.write_blocks(blocks, request.pending_kv, request_id=request.request_id)
                request.pending_kv = None
        samplers, logits = self.runner.execute(plan.scheduled)
        for request, n in plan.scheduled:
            n -= len(request.spec_token_ids)  # drafts count as computed once accepted (_sample)
            done = request.num_computed_tokens
            self.prompt_tokens_computed += max(0, min(done + n, request.num_prompt_tokens) - done)
            request.num_computed_tokens += n
            self.kv.cache_full_blocks(request)
        return self._postprocess(self._sample(samplers, logits))

    @property
    def speculates(self) -> bool:
        """Whether steps may carry drafts: the runner must give logits for every row of a request."""
        return type(self.runner) is ModelRunner and (
            self.speculator.config.method != "off"
            or any(r.params.speculative not in (None, "off") for r in self.requests.values())
        )

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> list[tuple[Request, list]]:
        """Each sampling request's new (token, logprob)s: one from the sampler, or 1 to k+1 from
        verifying k drafts."""
        if any(r.spec_token_ids for r in requests):
            return list(zip(requests, self.speculator.sample(requests, logits), strict=True))
        return [(r, [s]) for r, s in zip(requests, self.sampler(logits, requests), strict=True)]

    def _postprocess(self, sampled: list[tuple[Request, list]]) -> list[RequestOutput]:
        outputs = []
        for request, tokens in sampled:
            new_tokens, new_logprobs, new_text = [], [], ""
            status = handoff = None
            detok = request.detokenizer
            for token, logprob in tokens:
                request.output_token_ids.append(token)
                new_tokens.append(token)
                if request.matcher is not None:
                    structured.consume(request.matcher, token)
                if logprob is not None:
                    request.output_logprobs.append(logprob)
                    new_logprobs.append(logprob)
                status = self._stop_status(request, token)
                if detok is not None:
                    stop_string = detok.update([token], status is RequestStatus.FINISHED_STOPPED)
                    if stop_string is not None:
                        status, request.stop_reason = RequestStatus.FINISHED_STOPPED, stop_string
                    new_text += detok.next_text(status is not None)
                if status is None and request.prefill_only:
                    handoff = self._export(request, token, logprob)
                    status = RequestStatus.FINISHED_HANDOFF
                if status is not None:
                    break
            if len(tokens) > 1:  # accepted drafts may have completed blocks
                self.kv.cache_full_blocks(request)
            if status is not None:
                self.scheduler.finish(request, status)
                self.requests.pop(request.request_id, None)
                self.speculator.release(request.request_id)
            outputs.append(
                RequestOutput(
                    request.request_id,
                    new_tokens,
                    list(request.output_token_ids),
                    status is not None,
                    request.finish_reason,
                    request.num_prompt_tokens,
                    request.num_cached_tokens,
                    new_logprobs,
                    new_text,
                    detok.text if detok is not None else "",
                    request.stop_reason,
                    handoff,
                    request.scheduled_at,
                )
            )
        return outputs

    def _export(self, request: Request, token: int, logprob: TokenLogprob | None) -> KVHandoff:
        n = request.num_prompt_tokens
        blocks = request.block_ids[: self.kv.blocks_needed(n)]
        return KVHandoff(
            num_tokens=n,
            payload=self.runner.read_blocks(blocks),
            block_keys=tuple(self.kv.block_keys(request)[: n // self.config.block_size]),
            first_token=token,
            first_logprob=logprob,
            rng_state=request.generator.get_state(),
            layout=self.layout,
            num_cached_tokens=request.num_cached_tokens,
        )

    def _stop_status(self, request: Request, token: int) -> RequestStatus | None:
        p = request.params
        n_out = len(request.output_token_ids)
        if n_out >= p.min_tokens:
            if token in p.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
            if not p.ignore_eos and token in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if n_out >= p.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[RequestOutput]:
        """Run prompts to completion; returns each request's final output, in prompt order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{id(self)}-{i}-{len(self.requests)}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params_list, strict=True):
            self.add_request(rid, prompt, p)
        final: dict[str, RequestOutput] = {}
        while any(rid not in final for rid in ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[rid] for rid in ids]
