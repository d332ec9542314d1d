"""Tandem's compiled CPU kernels (shared/kernels) against the PyTorch code they replace.

Op by op on random tensors (paged decode attention with GQA, sliding windows and ragged lengths;
RoPE + KV write; residual + RMSNorm; SiLU * up in both layouts), then whole engines: the same
greedy tokens and log-probabilities with the kernels as without them, for tiny checkpoints of the
dense families (biases, partial rotary, yarn, sliding windows, qk-norm) and an MoE one, in batches
whose requests arrive at different steps so that mixed prefill/decode steps use the attention kernel
and all-decode steps the fused decoder stack (1-4 decodes: its one-team path, with keys split into
chunks over long contexts).
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from services.platform.cli.main import main as tandem_main
from shared import envs
from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.kernels import cpu_ops
from shared.models.attention import causal_mask
from shared.models.rope import apply_rotary
from tests.tiny_models import BASE, make_tiny

if not envs.cpu_kernels_enabled():
    pytest.skip("TANDEM_CPU_KERNELS=0", allow_module_level=True)


@pytest.fixture(scope="module")
def ops():
    ops = cpu_ops()
    assert ops is not None, "the CPU kernels failed to build (see the warning in the log)"
    return ops


def reference_decode(q, k_cache, v_cache, table, length, scale, window):
    """One sequence's decode attention the slow, obvious way: [H, D]."""
    bs = k_cache.shape[2]
    pos = torch.arange(length)
    keys = k_cache[table[pos // bs], :, pos % bs].transpose(0, 1)  # [K, L, D]
    values = v_cache[table[pos // bs], :, pos % bs].transpose(0, 1)
    group = q.shape[0] // keys.shape[0]
    allowed = pos > length - 1 - window if window > 0 else torch.ones(length, dtype=torch.bool)
    out = F.scaled_dot_product_attention(
        q[:, None],
        keys.repeat_interleave(group, 0),
        values.repeat_interleave(group, 0),
        attn_mask=allowed[None, None],
        scale=scale,
    )
    return out[:, 0]


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [-1, 7])
# head dims of whole vectors take register tiles of up to 4 heads (AVX2: 2) and 4 vectors, the rest a
# plain loop; odd block sizes put block edges inside a run of keys
@pytest.mark.parametrize(
    "heads,kv_heads,dim,bs", [(9, 3, 64, 16), (4, 4, 32, 16), (8, 1, 16, 16), (10, 2, 48, 5), (6, 3, 24, 7)]
)
def test_paged_decode_attention_matches_sdpa(ops, heads, kv_heads, dim, bs, window, cache_dtype):
    """float16 caches: the kernel converts rows as it loads them, so the reference attends over the
    same values as float32."""
    torch.manual_seed(0)
    blocks = 48
    k_cache, v_cache = (torch.randn(blocks, kv_heads, bs, dim).to(cache_dtype) for _ in range(2))
    lens = torch.tensor([1, 16, 17, 100, 33])
    tables = torch.stack([torch.randperm(blocks)[: -(-100 // bs)] for _ in lens])
    q = torch.randn(len(lens), heads * 2, dim)[:, ::2]  # a strided view, as the fused qkv gives
    out = ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, dim**-0.5, window)
    for i, n in enumerate(lens.tolist()):
        want = reference_decode(q[i], k_cache.float(), v_cache.float(), tables[i], n, dim**-0.5, window)
        torch.testing.assert_close(out[i], want, atol=2e-6, rtol=1e-5)


def test_paged_decode_attention_rejects_a_length_beyond_its_table(ops):
    cache = torch.zeros(4, 1, 16, 8)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.paged_decode_attention(
            torch.zeros(1, 1, 8), cache, cache, torch.tensor([[0, 1]]), torch.tensor([33]), 1.0, -1
        )


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rot_dim", [32, 16])
def test_rope_and_cache_rotates_in_place_and_writes_the_slots(ops, rot_dim, cache_dtype):
    """A float16 cache gets each row rounded to nearest (what .to(float16) gives)."""
    torch.manual_seed(1)
    tokens, heads, kv_heads, dim, bs = 5, 6, 2, 32, 4
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim)
    cos, sin = torch.randn(tokens, rot_dim // 2), torch.randn(tokens, rot_dim // 2)
    slots = torch.tensor([3, 9, 0, 22, 17])
    k_cache, v_cache = (torch.zeros(6, kv_heads, bs, dim, dtype=cache_dtype) for _ in range(2))
    want = apply_rotary(qkv[:, : (heads + kv_heads) * dim].reshape(tokens, -1, dim), cos, sin, rot_dim)
    values = qkv[:, (heads + kv_heads) * dim :].reshape(tokens, kv_heads, dim).clone()
    ops.rope_and_cache(qkv, cos, sin, k_cache, v_cache, slots, heads, rot_dim)
    torch.testing.assert_close(qkv[:, : (heads + kv_heads) * dim].reshape(tokens, -1, dim), want)
    for t, slot in enumerate(slots.tolist()):
        torch.testing.assert_close(k_cache[slot // bs, :, slot % bs], want[t, heads:].to(cache_dtype))
        assert torch.equal(v_cache[slot // bs, :, slot % bs], values[t].to(cache_dtype))
    untouched = torch.ones(6 * bs, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache.transpose(1, 2).reshape(6 * bs, -1)[untouched].any()


def test_add_rms_norm_adds_into_the_residual(ops):
    torch.manual_seed(2)
    x, add, weight = torch.randn(7, 96), torch.randn(96, 7).t(), torch.randn(96)
    residual = x.clone()
    out = ops.add_rms_norm(residual, add, weight, 1e-6)
    torch.testing.assert_close(residual, x + add)
    torch.testing.assert_close(out, F.rms_norm(x + add, (96,), weight, 1e-6))
    torch.testing.assert_close(
        ops.add_rms_norm(x.clone(), None, weight, 1e-6), F.rms_norm(x, (96,), weight, 1e-6)
    )


@pytest.mark.parametrize("layout", ["rows", "transposed", "one-row-strided"])
def test_silu_and_mul_in_both_layouts(ops, layout):
    torch.manual_seed(3)
    inter = 40
    gate_up = {
        "rows": torch.randn(6, 2 * inter) * 8,
        "transposed": (torch.randn(2 * inter, 6) * 8).t(),
        "one-row-strided": (torch.randn(2 * inter, 2) * 8)[:, :1].t(),
    }[layout]
    want = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    got = ops.silu_and_mul(gate_up)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if layout == "transposed":
        assert got.stride() == (1, 6), "a transposed input gives a transposed result (no copy for the GEMM)"


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 32, 33, 64])
def test_skinny_linear_matches_matmul(ops, rows):
    torch.manual_seed(rows)
    for n, k in [(960, 576), (61, 100), (7, 13)]:  # row counts and widths off every tile size
        x, w = torch.randn(rows, k), torch.randn(n, k) * 0.1
        got = ops.skinny_linear(x[:, :k], w)
        assert got.shape == (rows, n)
        torch.testing.assert_close(got, x @ w.t(), atol=1e-4, rtol=1e-4)
    x = torch.randn(96, rows).t()  # transposed input, as the decode stack passes between GEMMs
    w = torch.randn(40, 96)
    torch.testing.assert_close(ops.skinny_linear(x, w), x @ w.t(), atol=1e-4, rtol=1e-4)


def test_argmax_rows_takes_the_first_maximum_in_either_layout(ops):
    torch.manual_seed(5)
    logits = torch.randn(9, 50000)
    logits[3, 7] = logits[3, 40000] = 100.0  # a tie: the first index wins, as torch.argmax
    logits[5] = 0.0
    want = logits.argmax(-1)
    assert torch.equal(ops.argmax_rows(logits), want)
    assert torch.equal(ops.argmax_rows(logits.t().contiguous().t()), want)
    assert ops.argmax_rows(logits)[3] == 7 and ops.argmax_rows(logits)[5] == 0
    for r in (0, 3, 5):  # one row (a decode's logits), contiguous or as the GEMM's [N, 1] transposed
        assert ops.argmax_rows(logits[r : r + 1]).tolist() == [want[r]]
        assert ops.argmax_rows(logits[r : r + 1].t().contiguous().t()).tolist() == [want[r]]
    assert ops.argmax_rows(torch.full((1, 50000), float("-inf"))).tolist() == [0]
    for n in (1, 15, 17, 65, 1000):  # lengths past whole vectors: the maximum in the tail, or tied there
        row = torch.randn(1, n)
        row[0, n - 1] = 50.0
        assert ops.argmax_rows(row).tolist() == [n - 1]
        row[0, n // 2] = 50.0
        assert ops.argmax_rows(row).tolist() == [n // 2]


@pytest.mark.parametrize(
    "queries,keys,heads,kv_heads,dim,window",
    [
        (100, 100, 9, 3, 64, -1),
        (37, 37, 4, 2, 32, -1),
        (20, 100, 8, 1, 16, -1),
        (70, 70, 4, 4, 64, 9),
        (5, 40, 4, 2, 64, 8),
    ],
)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_paged_prefill_attention_matches_causal_sdpa(
    ops, queries, keys, heads, kv_heads, dim, window, cache_dtype
):
    """A chunk's queries are the last `queries` of `keys` positions (earlier ones: cached context),
    its keys and values read from scattered cache blocks (float16 ones: the reference takes the
    rounded values)."""
    torch.manual_seed(6)
    qkv = torch.randn(keys, heads + 2 * kv_heads, dim)  # strided views, as the fused projection gives
    q, k, v = qkv[keys - queries :, :heads], qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]
    k, v = k.to(cache_dtype).float(), v.to(cache_dtype).float()
    bs = 16
    blocks = (keys + bs - 1) // bs
    table = torch.randperm(blocks + 5)[:blocks]
    k_cache, v_cache = (torch.zeros(blocks + 5, kv_heads, bs, dim, dtype=cache_dtype) for _ in range(2))
    pos = torch.arange(keys)
    k_cache[table[pos // bs], :, pos % bs] = k.to(cache_dtype)
    v_cache[table[pos // bs], :, pos % bs] = v.to(cache_dtype)
    got = ops.paged_prefill_attention(q, k_cache, v_cache, table, keys, dim**-0.5, window)
    mask = causal_mask(queries, keys, window if window > 0 else None, q.device)
    want = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=mask,
        scale=dim**-0.5,
        enable_gqa=True,
    )[0].transpose(0, 1)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("rows", [65, 100, 512])
def test_gemm_rows_matches_matmul(ops, rows):
    torch.manual_seed(rows)
    x, w, b = torch.randn(rows, 200), torch.randn(75, 200) * 0.1, torch.randn(75)
    torch.testing.assert_close(ops.gemm_rows(x, w, b), x @ w.t() + b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        ops.gemm_rows(x.t().contiguous().t(), w, None), x @ w.t(), atol=1e-4, rtol=1e-4
    )


# -- whole engines ----------------------------------------------------------------------------------


def run(engine: LLMEngine, prompts: list[list[int]], max_tokens: tuple[int, ...] = (12, 12, 12, 12)):
    """Greedy with logprobs; the later prompts arrive while the first ones decode, and prefill in
    chunks of 16 tokens with a budget of 24 a step (mixed steps, chunks with cached context)."""
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=0) for n in max_tokens]
    ids = ["r0"]
    engine.add_request("r0", prompts[0], params[0])
    outputs: dict[str, list] = {}
    steps = 0
    while engine.has_unfinished():
        if steps == 3:
            for i, prompt in enumerate(prompts[1:], 1):
                ids.append(f"r{i}")
                engine.add_request(f"r{i}", prompt, params[i])
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_logprobs)
        steps += 1
    assert engine.pool.num_free == engine.pool.num_blocks
    return [[(lp.token_id, lp.logprob) for lp in outputs[i]] for i in ids]


CASES = {  # case -> is the whole decoder stack run by the kernels?
    "llama": True,
    "llama-bias": True,
    "llama-rope-yarn": True,
    "mistral-sliding": True,
    "qwen2": True,
    "qwen3": False,  # per-head q/k RMSNorm: the PyTorch layers, with the attention kernel
    "mixtral": False,  # MoE layers: likewise
}


@pytest.mark.parametrize("case", list(CASES))
def test_engine_gives_the_same_tokens_with_and_without_kernels(case, ops, tmp_path, store_root):
    name = import_tiny(case, f"kernels-{case}", tmp_path, store_root)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, BASE["vocab_size"], (n,), generator=gen).tolist() for n in (21, 5, 40, 16)]
    results = {}
    for kernels in (True, False):
        engine = LLMEngine.from_store(store_root / name, engine_config(kernels))
        assert (engine.runner.cpu_stack is not None) == (kernels and CASES[case])
        assert (engine.runner.kernels is not None) == kernels
        results[kernels] = run(engine, prompts)
    assert_same(results[True], results[False])


def import_tiny(case: str, name: str, tmp_path, store_root) -> str:
    """The tiny `case` checkpoint imported into the store as `name` by the CLI."""
    make_tiny(case, tmp_path / case)
    argv = ["models", "--store", str(store_root), "import", str(tmp_path / case), "--name", name]
    assert tandem_main(argv) == 0
    return name


def engine_config(kernels: bool, kv_cache_dtype: str = "auto") -> EngineConfig:
    return EngineConfig(
        block_size=4, num_blocks=256, long_prefill_chunk=16, max_num_batched_tokens=24, cpu_kernels=kernels,
        kv_cache_dtype=kv_cache_dtype,
    )  # fmt: skip


def assert_same(with_kernels, without):
    """Per request: the same greedy tokens, log-probabilities within 1e-4."""
    for fast, slow in zip(with_kernels, without, strict=True):
        assert [t for t, _ in fast] == [t for t, _ in slow]
        assert max(abs(a - b) for (_, a), (_, b) in zip(fast, slow, strict=True)) < 1e-4


@pytest.mark.parametrize("case", ["llama-bias", "mistral-sliding"])
def test_decode_steps_over_long_contexts(case, ops, tmp_path, store_root):
    """The one-team decode path (decode_step.h) where it splits each sequence's keys into chunks (64+
    keys): steps of 1, 2, 3 and 4 decodes as requests finish at different lengths, with biases or a
    sliding window, against the PyTorch path."""
    name = import_tiny(case, f"long-{case}", tmp_path, store_root)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, BASE["vocab_size"], (n,), generator=gen).tolist() for n in (90, 70, 130, 64)]
    results = [
        run(LLMEngine.from_store(store_root / name, engine_config(kernels)), prompts, (40, 30, 14, 20))
        for kernels in (True, False)
    ]
    assert_same(*results)


@pytest.mark.parametrize("case", ["llama", "mistral-sliding"])
def test_float16_kv_cache_through_the_kernels(case, ops, tmp_path, store_root):
    """kv_cache_dtype=float16: mixed steps, chunked prefill over cached context and one-team decode
    steps over long contexts read the float16 rows through the kernels as the PyTorch path reads
    them; the cache holds twice the blocks in the same bytes; an unknown dtype is refused."""
    name = import_tiny(case, f"kv16-{case}", tmp_path, store_root)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, BASE["vocab_size"], (n,), generator=gen).tolist() for n in (90, 5, 70, 33)]
    results = {}
    for kernels in (True, False):
        engine = LLMEngine.from_store(store_root / name, engine_config(kernels, "float16"))
        assert engine.runner.k_caches[0].dtype == torch.float16
        assert (engine.runner.cpu_stack is not None) == kernels
        results[kernels] = run(engine, prompts, (30, 12, 20, 14))
    assert_same(results[True], results[False])
    blocks = {
        dtype: LLMEngine.from_store(
            store_root / name, EngineConfig(kv_cache_dtype=dtype, kv_cache_bytes=2**20)
        ).pool.num_blocks
        for dtype in ("auto", "float16")
    }
    assert blocks["float16"] == 2 * blocks["auto"]
    with pytest.raises(ValueError, match="kv_cache_dtype must be 'auto' or one of"):
        LLMEngine.from_store(store_root / name, EngineConfig(kv_cache_dtype="fp8"))


def test_a_layer_stack_checks_a_steps_indices_and_goes_with_its_engine(ops, tmp_path, store_root):
    """The stack the kernels get once (make_stack) serves steps by its handle, giving the hidden
    state or the LM head's logits: a token id outside the vocabulary or a position past the RoPE
    table is refused with a clear error, and once the engine is gone its handle is refused too (not
    a read of freed weights)."""
    name = import_tiny("llama", "stack-llama", tmp_path, store_root)
    engine = LLMEngine.from_store(store_root / name, engine_config(True))
    stack = engine.runner.cpu_stack
    cos, sin, rows = stack._rope_rows(torch.tensor([3]), 3)
    one = torch.tensor([0])
    starts, queries, keys, tables = stack._no_chunks

    def step(handle, token, rows, *logits):
        args = (one, one, torch.tensor([[0]]), torch.tensor([4]), starts, queries, tables, keys, 64, *logits)
        return ops.forward_layers(handle, torch.tensor([token]), cos, sin, rows, *args)

    hidden = step(stack.stack, 5, rows)
    assert hidden.shape == (1, BASE["hidden_size"])
    # the LM head on the layers' thread team: the head's own GEMM on the hidden state
    with torch.inference_mode():
        expected = engine.model.compute_logits(hidden)
    torch.testing.assert_close(step(stack.stack, 5, rows, True), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="out of range of the embedding"):
        step(stack.stack, BASE["vocab_size"], rows)
    with pytest.raises(RuntimeError, match="past the RoPE table"):
        step(stack.stack, 5, torch.tensor([cos.shape[0]]))
    handle = stack.stack
    del engine, stack
    gc.collect()
    with pytest.raises(RuntimeError, match="no layer stack"):
        step(handle, 5, rows)
