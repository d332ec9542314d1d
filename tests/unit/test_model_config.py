"""ModelConfig parsing and MoE routing, without a model or a checkpoint."""

from __future__ import annotations

import pytest
import torch

from shared.models.config import ConfigError, MoEConfig, from_hf_config
from shared.models.moe import ExpertBank, TopKRouter

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 10,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}


def test_defaults_and_spellings():
    cfg = from_hf_config({**LLAMA, "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 5.0})
    assert cfg.num_kv_heads == 2 and cfg.head_dim == 4
    assert cfg.rope.rope_type == "linear" and cfg.rope.factor == 2.0 and cfg.rope.theta == 5.0
    cfg = from_hf_config({**LLAMA, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}})
    assert cfg.rope.theta == 7.0 and cfg.moe is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": None}, "'architectures' is missing"),
        ({"hidden_size": None}, "'hidden_size' is missing"),
        ({"num_key_value_heads": 3, "num_attention_heads": 4}, "not a multiple of num_key_value_heads"),
        ({"rope_parameters": {"rope_type": "longrope"}}, "rope type 'longrope' is not supported"),
        (
            {"model_type": "mixtral", "num_local_experts": 2, "num_experts_per_tok": 3},
            "exceeds the 2 experts",
        ),
    ],
)
def test_bad_configs_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        from_hf_config({**LLAMA, **change})


def test_sparse_layer_selection():
    moe = MoEConfig(
        num_experts=4, top_k=2, intermediate_size=8, first_dense_layers=1, dense_layers=(4,), sparse_step=1
    )
    assert [moe.is_sparse(i) for i in range(6)] == [False, True, True, True, False, True]
    every_other = MoEConfig(num_experts=4, top_k=2, intermediate_size=8, sparse_step=2)
    assert [every_other.is_sparse(i) for i in range(4)] == [False, True, False, True]


def test_softmax_router_renormalises_topk():
    router = TopKRouter(2, MoEConfig(num_experts=3, top_k=2, intermediate_size=4))
    router.weight.data = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    _, weights, experts = router(torch.tensor([[2.0, 1.0]]))
    assert experts.tolist() == [[0, 1]]
    p = torch.tensor([2.0, 1.0, -3.0]).softmax(-1)
    assert torch.allclose(weights, (p[:2] / p[:2].sum())[None])


def test_sigmoid_router_bias_steers_choice_not_weights():
    moe = MoEConfig(
        num_experts=4,
        top_k=1,
        intermediate_size=4,
        scoring="sigmoid",
        norm_topk_prob=False,
        routed_scaling_factor=2.0,
    )
    router = TopKRouter(1, moe)
    router.weight.data = torch.tensor([[1.0], [0.5], [0.0], [-1.0]])
    router.e_score_correction_bias[:] = torch.tensor([0.0, 0.0, 0.0, 5.0])
    _, weights, experts = router(torch.tensor([[1.0]]))
    assert experts.tolist() == [[3]]  # chosen by score + bias
    assert torch.allclose(weights, torch.sigmoid(torch.tensor([[-1.0]])) * 2.0)  # weighted by score alone


def test_group_limited_routing_excludes_other_groups():
    moe = MoEConfig(num_experts=4, top_k=2, intermediate_size=4, scoring="sigmoid", n_group=2, topk_group=1)
    router = TopKRouter(1, moe)
    # group 0 = experts {0,1} scores high on its best two; expert 2 alone is best overall but its group loses
    router.weight.data = torch.tensor([[2.0], [2.0], [3.0], [-5.0]])
    _, _, experts = router(torch.tensor([[1.0]]))
    assert sorted(experts[0].tolist()) == [0, 1]


def test_expert_bank_matches_dense_loop():
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=2, intermediate_size=6)
    bank = ExpertBank(5, moe)
    for p in bank.parameters():
        p.data.normal_()
    x = torch.randn(7, 5)
    experts = torch.randint(0, 4, (7, 2))
    weights = torch.rand(7, 2)
    want = torch.zeros_like(x)
    for t in range(7):
        for j in range(2):
            e = experts[t, j]
            h = torch.nn.functional.silu(bank.gate_proj[e] @ x[t]) * (bank.up_proj[e] @ x[t])
            want[t] += weights[t, j] * (bank.down_proj[e] @ h)
    assert torch.allclose(bank(x, weights, experts), want, atol=1e-5)
