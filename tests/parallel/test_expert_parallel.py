"""Expert parallelism over a real gloo process group (2 shard processes), and sparse upcycling:
tiny random Mixtral and Qwen2-MoE checkpoints made by transformers give transformers' logits with
ep_size 2; a shard with no tokens still takes part; the upcycled SmolLM2 (σ = 0) gives the dense
model's greedy tokens, and with σ > 0, ep_size 2 gives the same tokens as ep_size 1."""

from __future__ import annotations

import pytest
import torch
from ep_shard import run_group

from services.platform.cli.main import main as tandem_main
from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.tokenizer import Tokenizer
from tests.tiny_models import BASE, make_tiny

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("case", ["mixtral", "qwen2-moe"])
def test_ep2_logits_match_transformers(case, tmp_path, store_root):
    ref = make_tiny(case, tmp_path / case)
    name = f"ep-tiny-{case}"
    assert (
        tandem_main(["models", "--store", str(store_root), "import", str(tmp_path / case), "--name", name])
        == 0
    )
    torch.manual_seed(3)
    sequences = [torch.randint(0, BASE["vocab_size"], (n,)).tolist() for n in (19, 6)]
    results = run_group(2, "logits", {"model_dir": str(store_root / name), "sequences": sequences}, tmp_path)
    with torch.no_grad():
        for seq, res in zip(sequences, results, strict=True):
            want = ref(torch.tensor(seq)[None]).logits[0]
            assert (res["logits"] - want).abs().max().item() < 1e-4
    assert max(results[0]["empty_shard_max_diff"]) < 1e-5  # shard 1 had no tokens and still took part
    # each shard counted its own tokens' routing: k per token per MoE layer
    k = 2
    for seq, res in zip(sequences, results, strict=True):
        assert all(int(c.sum()) == (len(seq) + 7 * (res is results[0])) * k for c in res["expert_tokens"])


@pytest.fixture(scope="module")
def dense_tokens(default_model_dir):
    engine = LLMEngine.from_store(default_model_dir, EngineConfig(kv_cache_bytes=32 * 2**20))
    prompts = [
        engine.tokenizer.encode_chat([{"role": "user", "content": q}])
        for q in ("What is rain?", "Name a fruit.")
    ]
    out = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    return prompts, [o.output_token_ids for o in out]


def test_upcycled_model_equals_the_dense_one_and_ep2_equals_ep1(store_root, dense_tokens, tmp_path):
    prompts, dense = dense_tokens
    store = ["models", "--store", str(store_root)]
    assert tandem_main([*store, "upcycle", "smollm2-135m-instruct", "--experts", "4", "--top-k", "2",
                        "--name", "smollm2-moe4"]) == 0  # fmt: skip
    exact = LLMEngine.from_store(store_root / "smollm2-moe4", EngineConfig(kv_cache_bytes=32 * 2**20))
    assert exact.model.moe_layers() and exact.model.config.moe.num_experts == 4
    got = exact.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert [o.output_token_ids for o in got] == dense  # σ = 0: the dense model's function
    del exact

    assert tandem_main([*store, "upcycle", "smollm2-135m-instruct", "--experts", "4", "--top-k", "2",
                        "--noise", "0.05", "--name", "smollm2-moe4-noisy"]) == 0  # fmt: skip
    path = store_root / "smollm2-moe4-noisy"
    ep1 = LLMEngine.from_store(path, EngineConfig(kv_cache_bytes=32 * 2**20))
    want = [
        o.output_token_ids
        for o in ep1.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    ]
    del ep1
    assert want != dense  # the noise made the experts differ
    results = run_group(
        2, "generate", {"model_dir": str(path), "prompts": prompts, "max_tokens": 12}, tmp_path
    )
    assert [r["tokens"] for r in results] == want


def test_upcycle_rejects_bad_arguments(store_root, capsys):
    store = ["models", "--store", str(store_root)]
    assert (
        tandem_main(
            [*store, "upcycle", "smollm2-135m-instruct", "--experts", "4", "--top-k", "5", "--name", "x"]
        )
        == 1
    )
    assert "--top-k must be between 1 and --experts" in capsys.readouterr().err
    assert tandem_main([*store, "upcycle", "nope", "--experts", "4", "--top-k", "2", "--name", "x"]) == 1
    assert "not in the store" in capsys.readouterr().err


def group_model(store_root) -> str:
    """The upcycled 4-expert SmolLM2 (σ = 0.05) the group tests share, made in the store once."""
    name = "smollm2-moe4-group"
    if not (store_root / name).is_dir():
        assert tandem_main(["models", "--store", str(store_root), "upcycle", "smollm2-135m-instruct",
                            "--experts", "4", "--top-k", "2", "--noise", "0.05", "--name", name]) == 0  # fmt: skip
    return name


def greedy(model_dir, prompts, max_tokens: int = 6) -> list[list[int]]:
    """An unsharded engine's greedy tokens (EOS ignored): the reference for the group."""
    single = LLMEngine.from_store(model_dir, EngineConfig(kv_cache_bytes=32 * 2**20))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [o.output_token_ids for o in single.generate(prompts, params)]


def test_one_scheduler_drives_the_group_in_lock_step(store_root, tmp_path, default_model_dir):
    """Requests arriving at different steps, chunked prefills, 4 requests over 2 shards: the group's
    tokens equal one unsharded engine's under the same schedule, and the follower took every step."""
    from ep_shard import staggered

    name = group_model(store_root)
    single = LLMEngine.from_store(
        store_root / name,
        EngineConfig(kv_cache_bytes=32 * 2**20, enable_prefix_caching=False, long_prefill_chunk=8,
                     max_num_batched_tokens=24),
    )  # fmt: skip
    prompts = [single.tokenizer.encode_chat([{"role": "user", "content": q}])
               for q in ("What is rain?", "Name a fruit.", "Why is the sky blue?", "Hi")]  # fmt: skip
    want = staggered(single, prompts, 6)
    del single
    leader, follower = run_group(2, "group", {"model_dir": str(store_root / name), "prompts": prompts,
                                              "max_tokens": 6}, tmp_path)  # fmt: skip
    assert leader["tokens"] == want
    assert follower["steps"] == leader["steps"] > 0
    assert leader["assigned"] == []  # every request finished: no shard assignment left behind
    assert follower["expert_tokens"] > 0  # the follower's experts served tokens routed from the leader


def test_a_group_decodes_from_handed_over_kv(store_root, tmp_path):
    """KV from an unsharded prefill-only engine, imported into a 2-shard group (each request's KV
    written on the shard that owns it): the monolithic tokens."""
    name = group_model(store_root)
    tok = Tokenizer.from_dir(store_root / name)
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in ("What is rain?", "Hi")]
    want = greedy(store_root / name, prompts)
    leader, follower = run_group(2, "group_handoff", {"model_dir": str(store_root / name), "prompts": prompts,
                                                      "max_tokens": 6}, tmp_path)  # fmt: skip
    assert leader["tokens"] == want
    assert follower["steps"] > 0


def test_a_group_with_prefix_caching_reuses_blocks_on_the_owning_shard(store_root, tmp_path):
    """Requests sharing a long system prompt arrive one by one while others run: later ones reuse the
    cached prefix, on the shard whose cache holds it, and every token equals an unsharded engine's."""
    name = group_model(store_root)
    tok = Tokenizer.from_dir(store_root / name)
    system = "You answer questions about weather, fruit and the sky, in one short sentence, politely."
    prompts = [
        tok.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": q}])
        for q in ("What is rain?", "Name a fruit.", "Why is the sky blue?", "Hi")
    ]
    want = greedy(store_root / name, prompts)
    leader, follower = run_group(2, "group_prefix", {"model_dir": str(store_root / name), "prompts": prompts,
                                                     "max_tokens": 6}, tmp_path)  # fmt: skip
    assert leader["tokens"] == want
    assert leader["cached"][0] == 0 and all(c >= 16 for c in leader["cached"][1:])  # the shared blocks
    assert len(set(leader["shards"])) == 1  # every reuse ran where the prefix lives
    assert follower["steps"] > 0
