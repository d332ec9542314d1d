"""ModelRunner: owns the model and its paged KV cache; turns a scheduled step into logits.

execute(scheduled) flattens the step — every scheduled request contributes its next n tokens — into
input ids [T], positions [T], slot mapping [T] and the attention metadata, runs one forward, and
returns logits only for the requests whose last token was computed this step (those sample).
"""

from __future__ import annotations

import torch

from shared.engine.paged_attention import PagedAttention, PagedMetadata
from shared.engine.request import Request
from shared.models.transformer import CausalLM


def kv_bytes_per_token(model: CausalLM, dtype: torch.dtype) -> int:
    cfg = model.config
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.tensor([], dtype=dtype).element_size()


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, kv_dtype: torch.dtype):
        self.model = model
        self.block_size = block_size
        cfg = model.config
        self.device = next(model.parameters()).device
        shape = (num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k_caches = [
            torch.zeros(shape, dtype=kv_dtype, device=self.device) for _ in range(cfg.num_layers)
        ]
        self.v_caches = [
            torch.zeros(shape, dtype=kv_dtype, device=self.device) for _ in range(cfg.num_layers)
        ]

    def slots(self, request: Request, start: int, end: int) -> torch.Tensor:
        """Cache slots of token positions [start, end) of a request."""
        pos = torch.arange(start, end)
        table = torch.tensor(request.block_ids, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Request, int]]) -> tuple[list[Request], torch.Tensor]:
        ids, positions, slot_maps, prefills = [], [], [], []
        decode_rows, decode_slots, decode_pos = [], [], []
        sample_rows, samplers = [], []
        row = 0
        for request, n in scheduled:
            start, end = request.num_computed_tokens, request.num_computed_tokens + n
            ids.extend(request.all_token_ids[start:end])
            positions.append(torch.arange(start, end))
            slot_maps.append(self.slots(request, start, end))
            if n == 1 and start > 0:
                decode_rows.append(row)
                decode_slots.append(self.slots(request, 0, end))
                decode_pos.append(start)
            else:
                prefills.append((row, n, self.slots(request, 0, end).to(self.device)))
            row += n
            if end == request.num_tokens:
                sample_rows.append(row - 1)
                samplers.append(request)
        meta = self._metadata(slot_maps, decode_rows, decode_slots, decode_pos, prefills)
        attn = PagedAttention(self.k_caches, self.v_caches, meta)
        hidden = self.model(torch.tensor(ids, device=self.device), torch.cat(positions).to(self.device), attn)
        logits = self.model.compute_logits(
            hidden[torch.tensor(sample_rows, dtype=torch.long, device=self.device)]
        )
        return samplers, logits.float()

    def _metadata(self, slot_maps, decode_rows, decode_slots, decode_pos, prefills) -> PagedMetadata:
        dev = self.device
        s_max = max((len(s) for s in decode_slots), default=0)
        padded = torch.zeros(len(decode_slots), s_max, dtype=torch.long)
        valid = torch.zeros(len(decode_slots), s_max, dtype=torch.bool)
        for i, s in enumerate(decode_slots):
            padded[i, : len(s)] = s
            valid[i, : len(s)] = True
        return PagedMetadata(
            slot_mapping=torch.cat(slot_maps).to(dev),
            decode_rows=torch.tensor(decode_rows, dtype=torch.long, device=dev),
            decode_slots=padded.to(dev),
            decode_valid=valid.to(dev),
            decode_positions=torch.tensor(decode_pos, dtype=torch.long, device=dev),
            prefills=prefills,
        )
