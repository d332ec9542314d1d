"""LLMEngine: continuous batching over a paged KV cache. `step()` is schedule -> run -> postprocess.

    engine = LLMEngine.from_store(path, EngineConfig())
    outputs = engine.generate([prompt_ids, ...], SamplingParams(max_tokens=64))

or incrementally: add_request(...), then step() until has_unfinished() is False; each step returns
the new tokens of every request that produced one, and abort(request_id) frees a request's blocks
at once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.engine.block_pool import BlockPool
from shared.engine.kv_cache_manager import KVCacheManager
from shared.engine.model_runner import ModelRunner, kv_bytes_per_token
from shared.engine.request import Request, RequestStatus, TokenLogprob
from shared.engine.sampler import Sampler
from shared.engine.sampling_params import SamplingParams
from shared.engine.scheduler import Scheduler, SchedulerConfig
from shared.models.loader import load_model
from shared.models.transformer import CausalLM

log = logging.getLogger("tandem.engine")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None  # default: kv_cache_bytes / bytes per block
    kv_cache_bytes: int = 512 * 2**20
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    long_prefill_chunk: int = 512
    enable_prefix_caching: bool = True
    device: str = "cpu"
    dtype: str = "float32"
    max_model_len: int | None = None  # default: the model's max_position_embeddings

    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got '{self.dtype}'")
        return DTYPES[self.dtype]


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


class LLMEngine:
    def __init__(self, model: CausalLM, config: EngineConfig, model_id: str = "model", eos_token_ids=()):
        # The engine owns the model from here on: projections are fused for serving.
        self.model = model.eval().fuse_for_inference()
        self.config = config
        self.eos_token_ids = tuple(eos_token_ids)
        dtype = config.torch_dtype()
        per_block = kv_bytes_per_token(model, dtype) * config.block_size
        num_blocks = config.num_blocks or max(1, config.kv_cache_bytes // per_block)
        self.max_model_len = config.max_model_len or model.config.max_position_embeddings
        cfg = model.config
        layout = f"{dtype}/{cfg.num_layers}L/{cfg.num_kv_heads}x{cfg.head_dim}"
        self.pool = BlockPool(num_blocks, config.block_size)
        self.kv = KVCacheManager(self.pool, (model_id, layout), config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.long_prefill_chunk),
            self.kv,
        )
        self.runner = ModelRunner(model, num_blocks, config.block_size, dtype)
        self.sampler = Sampler()
        self.requests: dict[str, Request] = {}
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
        path = Path(path)
        model = load_model(path, device=config.device, dtype=config.torch_dtype())
        gen_file = path / "generation_config.json"
        eos = json.loads(gen_file.read_text()).get("eos_token_id") if gen_file.is_file() else None
        eos = model.config.eos_token_id if eos is None else eos
        eos_ids = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
        return cls(model, config, model_id or path.name, eos_ids)

    # -- requests -----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        if request_id in self.requests:
            raise ValueError(f"request_id '{request_id}' is already in use")
        if not prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        vocab = self.model.config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise ValueError(f"prompt contains token ids outside the vocabulary of {vocab}")
        params.validate(vocab)
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
        request = Request(request_id, list(prompt_token_ids), params, self.eos_token_ids)
        self.requests[request_id] = request
        self.scheduler.add(request)
        return request

    def abort(self, request_id: str) -> bool:
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        samplers, logits = self.runner.execute(plan.scheduled)
        for request, n in plan.scheduled:
            request.num_computed_tokens += n
            self.kv.cache_full_blocks(request)
        return self._postprocess(samplers, self.sampler(logits, samplers))

    def _postprocess(self, requests: list[Request], sampled) -> list[RequestOutput]:
        outputs = []
        for request, (token, logprob) in zip(requests, sampled, strict=True):
            request.output_token_ids.append(token)
            if logprob is not None:
                request.output_logprobs.append(logprob)
            status = self._stop_status(request, token)
            if status is not None:
                self.scheduler.finish(request, status)
                self.requests.pop(request.request_id, None)
            outputs.append(
                RequestOutput(
                    request.request_id,
                    [token],
                    list(request.output_token_ids),
                    status is not None,
                    request.finish_reason,
                    request.num_prompt_tokens,
                    request.num_cached_tokens,
                    [logprob] if logprob is not None else [],
                )
            )
        return outputs

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
