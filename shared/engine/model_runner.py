"""ModelRunner: owns the model and its paged KV cache; turns a scheduled step into logits.

execute(scheduled) flattens the step — every scheduled request contributes its next n tokens — into
input ids [T], positions [T], slot mapping [T] and the attention metadata, runs one forward, and
returns logits only for the requests whose last token was computed this step (those sample): one row
each, or 1 + k rows for a request carrying k speculative drafts (its last token's and every draft's).
The step's index tensors are built from Python lists with one tensor call each, so a decode step's
bookkeeping costs far less than its matmuls.

It also moves KV blocks in and out of the cache for disaggregation: `read_blocks` gives the KV block
payload of ARCHITECTURE.md ([blocks, layers, 2 (K, V), K heads, B, D], one contiguous tensor) and
`write_blocks` puts such a payload into given blocks.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from shared.engine.cpu_stack import CpuStack
from shared.engine.paged_attention import KERNEL_KV_DTYPES, PagedAttention, PagedMetadata, PrefillChunk
from shared.engine.request import Request
from shared.kernels import cpu_ops
from shared.models.lora import LoraBank
from shared.models.transformer import CausalLM

log = logging.getLogger(__name__)


def kv_bytes_per_token(model: CausalLM, dtype: torch.dtype) -> int:
    cfg = model.config
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.tensor([], dtype=dtype).element_size()


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        kv_dtype: torch.dtype,
        cpu_kernels: bool = True,
        int8_activations: bool = False,
    ):
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_dtype = kv_dtype
        cfg = model.config
        self.device = next(model.parameters()).device
        self.num_kv_heads = cfg.num_kv_heads
        shape = (num_blocks, cfg.num_kv_heads, block_size, cfg.head_dim)
        self.k_caches = [
            torch.zeros(shape, dtype=kv_dtype, device=self.device) for _ in range(cfg.num_layers)
        ]
        self.v_caches = [
            torch.zeros(shape, dtype=kv_dtype, device=self.device) for _ in range(cfg.num_layers)
        ]
        # Tandem's compiled CPU kernels (shared/kernels), where they apply: the whole decoder stack
        # of dense models (cpu_stack.py); for other models their attention and GEMMs.
        self.kernels = None
        if cpu_kernels and self.device.type == "cpu":
            if kv_dtype in KERNEL_KV_DTYPES:
                self.kernels = cpu_ops()
            else:
                log.warning(
                    "the CPU kernels read float32 and float16 KV caches, not %s: PyTorch's path runs",
                    kv_dtype,
                )
        self.cpu_stack = CpuStack.build(model, self.kernels, self.k_caches, self.v_caches, int8_activations)
        self.loras: LoraBank | None = None  # set by the engine when it loads its first adapter
        if self.kernels is not None:
            CpuStack.install_gemm(model, self.kernels, int8_activations)

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Shape of one block's payload: [layers, 2, K, B, D]."""
        return (len(self.k_caches), 2, *self.k_caches[0].shape[1:])

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Request, int]]) -> tuple[list[Request], torch.Tensor]:
        rows = _StepRows.of(scheduled, self.block_size)
        dev = self.device
        input_ids, input_positions, meta = self._metadata(rows)
        adapters = None
        if self.loras is not None and any(r.lora for r, _ in scheduled):
            adapters = [r.lora for r, n in scheduled for _ in range(n)]  # the adapter of every row
        sample = None if len(rows.sample_rows) == rows.count else rows.sample_rows
        if self.cpu_stack is not None and adapters is None:
            last = max(rows.positions, default=0)
            return rows.samplers, self.cpu_stack.logits(input_ids, input_positions, last, meta, sample)
        with self.loras.active(adapters, dev) if adapters else nullcontext():  # (they hook the layers)
            hidden = self.model(
                input_ids, input_positions, PagedAttention(self.k_caches, self.v_caches, meta)
            )
        if sample is not None:
            hidden = hidden[torch.tensor(sample, dtype=torch.long, device=dev)]
        return rows.samplers, self.model.compute_logits(hidden).float()

    def _metadata(self, rows: _StepRows) -> tuple[torch.Tensor, torch.Tensor, PagedMetadata]:
        """The step's input ids, positions and attention metadata: every index tensor a view of one
        tensor made from one list (one copy to the device; each tensor made on its own cost a few
        microseconds of a one-token step, from cold caches)."""
        tables, n = rows.decode_tables, rows.count
        width = max((len(t) for t in tables), default=0)
        flat = [*rows.ids, *rows.positions, *rows.slots, *rows.decode_rows, *rows.decode_lens]
        for t in tables:
            flat += t
            flat += [0] * (width - len(t))
        d = len(tables)
        parts = torch.tensor(flat, dtype=torch.long).to(self.device).split([n, n, n, d, d, d * width])
        ids, positions, slots, decode_rows, decode_lens, decode_tables = parts
        meta = PagedMetadata(
            slots=slots,
            decode_rows=decode_rows,
            decode_tables=decode_tables.view(d, width),
            decode_lens=decode_lens,
            prefills=[PrefillChunk(start, q, s, t) for start, q, s, t in rows.prefills],
            block_size=self.block_size,
            num_kv_heads=self.num_kv_heads,
            all_decode=bool(tables) and d == n,
            kernels=self.kernels,
        )
        return ids, positions, meta

    # -- KV block payloads (disaggregation) --------------------------------------------------------

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """The KV of the given blocks: [len(block_ids), layers, 2, K, B, D], contiguous, on CPU."""
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        per_layer = [
            torch.stack((k[idx], v[idx]), dim=1) for k, v in zip(self.k_caches, self.v_caches, strict=True)
        ]
        return torch.stack(per_layer, dim=1).cpu().contiguous()

    def write_blocks(
        self, block_ids: list[int], payload: torch.Tensor, request_id: str | None = None
    ) -> None:
        """Put a payload from `read_blocks` (same layout, any device) into the given blocks.
        (`request_id` names the owner, for runners that place requests on shards.)"""
        expected = (len(block_ids), *self.block_shape)
        if tuple(payload.shape) != expected:
            raise ValueError(f"KV payload has shape {tuple(payload.shape)}, this cache expects {expected}")
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        payload = payload.to(device=self.device, dtype=self.kv_dtype)
        for layer, (k, v) in enumerate(zip(self.k_caches, self.v_caches, strict=True)):
            k.index_copy_(0, idx, payload[:, layer, 0])
            v.index_copy_(0, idx, payload[:, layer, 1])


@dataclass
class _StepRows:
    """A step flattened: every scheduled request's next n tokens as rows of one batch, with where
    each row's KV goes and how it attends (decode rows: one block table and key count each; prefill
    chunks: a run of rows), and which rows sample."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    decode_rows: list[int] = field(default_factory=list)
    decode_tables: list[list[int]] = field(default_factory=list)
    decode_lens: list[int] = field(default_factory=list)
    prefills: list[tuple[int, int, int, list[int]]] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)
    samplers: list[Request] = field(default_factory=list)
    count: int = 0

    @classmethod
    def of(cls, scheduled: list[tuple[Request, int]], bs: int) -> _StepRows:
        out = cls()
        for request, n in scheduled:
            out._add(request, n, bs)
        return out

    def _add(self, request: Request, n: int, bs: int) -> None:
        row = self.count
        start, end = request.num_computed_tokens, request.num_computed_tokens + n
        table = request.block_ids
        drafts = request.spec_token_ids  # speculative decoding: every row after the last token samples
        if n == 1:
            self.ids.append(
                request.all_token_ids[start]
                if start < request.num_prompt_tokens
                else request.output_token_ids[start - request.num_prompt_tokens]
            )
        elif drafts:
            self.ids.extend((request.all_token_ids + drafts)[start:end])
        else:
            self.ids.extend(request.all_token_ids[start:end])
        self.positions.extend(range(start, end))
        self.slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
        if n == 1 and start > 0:
            self.decode_rows.append(row)
            self.decode_tables.append(table[: (end + bs - 1) // bs])
            self.decode_lens.append(end)
        elif drafts and start > 0:  # a few rows over a long context: each attends like a decode
            for i in range(n):
                self.decode_rows.append(row + i)
                self.decode_tables.append(table[: (start + i + bs) // bs])
                self.decode_lens.append(start + i + 1)
        else:
            self.prefills.append((row, n, end, table[: (end + bs - 1) // bs]))
        self.count = row + n
        if end == request.num_tokens + len(drafts):
            self.sample_rows.extend(range(self.count - 1 - len(drafts), self.count))
            self.samplers.append(request)
