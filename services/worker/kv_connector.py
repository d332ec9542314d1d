"""The worker's side of KV transfer: what moves between its engine and the KV store.

  fetch_prefix   before a prefill: the KV of the prompt's longest prefix the store holds beyond the
                 engine's own prefix cache (so only the rest is computed)
  publish        after a prefill_only request's first token: put the prompt's new full blocks in the
                 store, lease them for the decode, and describe the handoff as a KVHandle (the keys
                 the store pinned + the rest of the KV inline; without a store everything is inline)
  import_handle  on the decode side: the handle's blocks (the local prefix cache first, then the
                 store, then the inline tail) as a KVHandoff for the engine, the lease released

A store that fails is worked around (the prompt computed here, the KV sent inline); a handoff whose
inline part would not fit in a gRPC message raises HandoffTooLarge. Counters and timers feed the
worker's GetLoad report and metrics.
"""

from __future__ import annotations

import logging
import time

import grpc
import torch

from shared.engine import AsyncLLMEngine
from shared.engine.kv_transfer import KVHandoff, from_wire, to_wire
from shared.kvstore.client import KVStoreClient
from shared.rpc.convert import logprob_from_proto, logprob_to_proto
from shared.rpc.security import MAX_MESSAGE_BYTES
from shared.telemetry.metrics import family
from tandem.v1 import common_pb2

log = logging.getLogger("tandem.worker")
#: the most KV a handoff carries inline (what the store could not take), below the gRPC message cap
MAX_INLINE_BYTES = MAX_MESSAGE_BYTES - 4 * 2**20


class HandoffTooLarge(Exception):
    """A handoff whose inline part would not fit in one gRPC message."""


class KVConnector:
    def __init__(
        self,
        engine: AsyncLLMEngine,
        kvstore: str | None = None,
        lease_ttl: float = 60.0,
        max_inline_bytes: int = MAX_INLINE_BYTES,
    ):
        self.engine = engine
        self.store = KVStoreClient(kvstore) if kvstore else None
        self.lease_ttl = lease_ttl
        self.max_inline_bytes = max_inline_bytes
        self.counters = {"store_fetched_blocks": 0, "store_published_blocks": 0}
        self.timers = {"kv_publish_seconds": 0.0, "kv_import_seconds": 0.0, "kv_fetch_seconds": 0.0}

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()

    def metrics(self, model: str, role: str):
        """KV moved between this worker and the store (disaggregation and shared prefixes)."""
        labels = [model, role]
        blocks = family("counter", "kv_transfer_blocks", "KV blocks moved to or from the KV store.",
                        ["model_name", "role", "direction"])  # fmt: skip
        blocks.add_metric([*labels, "fetched"], self.counters["store_fetched_blocks"])
        blocks.add_metric([*labels, "published"], self.counters["store_published_blocks"])
        seconds = family("counter", "kv_transfer_seconds", "Time spent moving KV, by operation.",
                         ["model_name", "role", "op"])  # fmt: skip
        for op in ("publish", "import", "fetch"):
            seconds.add_metric([*labels, op], self.timers[f"kv_{op}_seconds"])
        return [blocks, seconds]

    async def fetch_prefix(
        self, prompt: list[int], cache_salt: str | None, lora: str | None = None
    ) -> torch.Tensor | None:
        t0 = time.perf_counter()
        try:
            return await self._fetch_prefix(prompt, cache_salt, lora)
        finally:
            self.timers["kv_fetch_seconds"] += time.perf_counter() - t0

    async def publish(self, handoff: KVHandoff) -> common_pb2.KVHandle:
        t0 = time.perf_counter()
        try:
            return await self._publish(handoff)
        finally:
            self.timers["kv_publish_seconds"] += time.perf_counter() - t0

    async def import_handle(self, handle: common_pb2.KVHandle) -> KVHandoff:
        """Raises ValueError for a handle this worker cannot take, grpc.aio.AioRpcError when the
        store fails its blocks; the lease is released either way (the blocks are copied, or lost)."""
        t0 = time.perf_counter()
        try:
            return await self._import(handle)
        finally:
            self.timers["kv_import_seconds"] += time.perf_counter() - t0
            await self.release(handle.lease_id)

    async def _fetch_prefix(
        self, prompt: list[int], cache_salt: str | None, lora: str | None = None
    ) -> torch.Tensor | None:
        """The KV of the prompt's longest prefix the store has beyond what this engine caches (with
        the cached part copied in front), or None when the local cache does as well."""
        eng = self.engine.engine
        if self.store is None or not eng.config.enable_prefix_caching:
            return None
        keys = eng.prompt_keys(prompt, cache_salt, lora)[: (len(prompt) - 1) // eng.config.block_size]
        local = eng.cached_prefix_len(keys)
        try:
            _, anywhere = await self.store.lookup(keys)
            if anywhere <= local:
                return None
            have = await self.engine.call(eng.read_cached, keys[:local])
            fetched = await self.store.get_blocks(keys[have.shape[0] : anywhere], eng.layout)
        except grpc.aio.AioRpcError as e:  # the store is down or lost a block: compute it here
            log.warning("KV store prefix fetch failed (%s); computing the prompt locally", e.code().name)
            return None
        self.counters["store_fetched_blocks"] += fetched.shape[0]
        return torch.cat([have, fetched.to(have.dtype)])

    async def _publish(self, handoff: KVHandoff) -> common_pb2.KVHandle:
        """Put the prompt's new full blocks in the store, lease them, and describe the handoff."""
        keys = list(handoff.block_keys)
        lease_id = ""
        if self.store is not None and keys:
            layout = self.engine.engine.layout
            try:
                _, present = await self.store.lookup(keys)
                if present < len(keys):
                    stored = await self.store.put_blocks(
                        keys[present:], handoff.payload[present : len(keys)], layout
                    )
                    self.counters["store_published_blocks"] += stored
                lease_id, pinned = await self.store.lease(keys, self.lease_ttl)
                keys = keys[:pinned]  # blocks the store could not pin (evicted already) travel inline
            except grpc.aio.AioRpcError as e:  # hand everything over inline instead
                log.warning("KV store publish failed (%s); handing the KV over inline", e.code().name)
                keys, lease_id = [], ""
        else:
            keys = []
        tail = handoff.payload[len(keys) :]
        inline_bytes = tail.numel() * tail.element_size()
        if inline_bytes > self.max_inline_bytes:
            await self.release(lease_id)
            raise HandoffTooLarge(
                f"the KV handoff would send {inline_bytes / 2**20:.1f} MiB inline (limit "
                f"{self.max_inline_bytes / 2**20:.0f} MiB: the KV store is missing or full); prefill it on the "
                "decode worker"
            )
        dtype, shape, data = to_wire(tail)
        handle = common_pb2.KVHandle(
            layout=handoff.layout,
            num_tokens=handoff.num_tokens,
            block_keys=keys,
            inline_dtype=dtype,
            inline_shape=shape,
            inline_kv=data,
            first_token=handoff.first_token,
            rng_state=handoff.rng_state.numpy().tobytes(),
            lease_id=lease_id,
            num_cached_tokens=handoff.num_cached_tokens,
        )
        if handoff.first_logprob is not None:
            handle.first_logprob.CopyFrom(logprob_to_proto(handoff.first_logprob))
        return handle

    async def _import(self, handle: common_pb2.KVHandle) -> KVHandoff:
        eng = self.engine.engine
        if handle.layout != eng.layout:
            raise ValueError(f"KV handle has layout '{handle.layout}', this worker uses '{eng.layout}'")
        keys = list(handle.block_keys)
        inline = from_wire(handle.inline_dtype, tuple(handle.inline_shape), handle.inline_kv)
        parts = []
        if keys:
            have = await self.engine.call(eng.read_cached, keys)
            parts.append(have)
            if have.shape[0] < len(keys):
                if self.store is None:
                    raise ValueError("the KV handle names store blocks but this worker has no --kvstore")
                fetched = await self.store.get_blocks(keys[have.shape[0] :], eng.layout)
                self.counters["store_fetched_blocks"] += fetched.shape[0]
                parts.append(fetched)
        parts.append(inline)
        payload = torch.cat([p.to(inline.dtype) for p in parts]) if len(parts) > 1 else inline
        rng = torch.frombuffer(bytearray(handle.rng_state), dtype=torch.uint8) if handle.rng_state else None
        if rng is None:
            raise ValueError("the KV handle has no rng_state")
        return KVHandoff(
            num_tokens=handle.num_tokens,
            payload=payload,
            block_keys=tuple(keys),
            first_token=handle.first_token,
            first_logprob=logprob_from_proto(handle.first_logprob)
            if handle.HasField("first_logprob")
            else None,
            rng_state=rng,
            layout=handle.layout,
            num_cached_tokens=handle.num_cached_tokens,
        )

    async def release(self, lease_id: str) -> None:
        if self.store is None or not lease_id:
            return
        try:
            await self.store.release(lease_id)
        except grpc.aio.AioRpcError as e:  # it expires on its own
            log.warning("could not release KV lease %s: %s", lease_id, e.code().name)
