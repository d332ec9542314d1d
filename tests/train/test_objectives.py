"""The trainer's parts in one process (no Ray): loss masking, packing, DPO, balancing, LoRA ⇄ peft,
gradient accumulation, schedules, and dataset / job-spec validation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from shared.models.loader import load_model
from shared.store import ModelStore
from shared.tokenizer import Tokenizer
from shared.train.config import JobError, parse_job
from shared.train.data import (
    DatasetError,
    Example,
    chat_sequence,
    collate,
    document_sequences,
    load_dataset,
    pack,
)
from shared.train.data import _check_messages as check_messages
from shared.train.lora import adapter_state, save_adapter
from shared.train.objectives import dpo_loss, moe_balance_loss, target_logprobs
from shared.train.schedule import lr_multiplier
from shared.train.trainer import Trainer, TrainingModel, prepare_model
from tests.train.train_helpers import add_tiny_llama, fact_rows, job, write_jsonl


@pytest.fixture(scope="module")
def tok(default_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_model_dir):
    """(store, transformers model) with a tiny Llama named tiny-llama that uses SmolLM2's tokenizer."""
    store = ModelStore(tmp_path_factory.mktemp("train-store"))
    hf = add_tiny_llama(store, default_model_dir)
    return store, hf


def _conversation():
    return check_messages(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Teal ✓", "weight": 0},
            {"role": "user", "content": "Another, in French?"},
            {"role": "assistant", "content": "Vert, ça va ?"},
        ],
        "test",
    )


def test_sft_targets_are_exactly_the_weighted_assistant_turns(tok):
    seq = chat_sequence(tok, _conversation(), "test", 512)
    targeted = [t for t, m in zip(seq.tokens, seq.targets, strict=True) if m]
    assert tok.decode(targeted) == "Vert, ça va ?<|im_end|>"  # weight 0 turn and the prompt: no loss
    whole = tok.encode_chat([{"role": m["role"], "content": m["content"]} for m in _conversation()], False)
    assert list(seq.tokens) == whole  # training sees the tokens serving would


def test_sft_loss_equals_hand_computation(tiny, tok):
    store, hf = tiny
    seq = chat_sequence(tok, _conversation(), "test", 512)
    lm = load_model(store.path("tiny-llama"))
    total, aux, _ = TrainingModel(lm, "sft", 0.1)(collate([Example((seq,))]))
    with torch.no_grad():
        logits = hf(torch.tensor([seq.tokens])).logits[0].log_softmax(-1)  # [T, V]
    by_hand = -sum(float(logits[j - 1, seq.tokens[j]]) for j in range(1, len(seq.tokens)) if seq.targets[j])
    assert aux is None
    assert float(total) == pytest.approx(by_hand, rel=1e-5)
    # the mask matters: the loss over every token differs
    every = -sum(float(logits[j - 1, seq.tokens[j]]) for j in range(1, len(seq.tokens)))
    assert abs(every - by_hand) > 1.0


def test_packed_documents_never_attend_across_the_boundary(tiny, tok):
    store, _ = tiny
    lm = load_model(store.path("tiny-llama"))
    a = document_sequences(tok, "The first document talks about rivers and boats.", 64)
    b = document_sequences(tok, "A second one, about mountains.", 64)
    (row,) = pack(a + b, 64)
    assert len(row.segments) == 2
    packed = collate([row])
    assert packed.positions.tolist() == list(range(len(a[0].tokens))) + list(range(len(b[0].tokens)))
    with torch.no_grad():
        in_row = target_logprobs(lm, packed)
        alone = target_logprobs(lm, collate([Example((b[0],))]))
        glued = target_logprobs(
            lm, collate([Example((type(b[0])(a[0].tokens + b[0].tokens, a[0].targets + b[0].targets),))])
        )
    n_b = alone.shape[0]
    torch.testing.assert_close(in_row[-n_b:], alone, atol=1e-5, rtol=1e-5)
    assert (glued[-n_b:] - alone).abs().max() > 1e-3  # one sequence would have leaked across


def test_dpo_loss_is_the_formula():
    policy = torch.tensor([-10.0, -12.0, -7.5, -7.0])  # (chosen, rejected) × 2 pairs
    reference = torch.tensor([-11.0, -11.5, -8.0, -6.0])
    beta = 0.3
    loss, stats = dpo_loss(policy, reference, beta)
    expected = 0.0
    for c, r, rc, rr in ((-10.0, -12.0, -11.0, -11.5), (-7.5, -7.0, -8.0, -6.0)):
        z = beta * ((c - rc) - (r - rr))
        expected += -math.log(1 / (1 + math.exp(-z)))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert stats["reward_accuracy_sum"] == 2.0  # both pairs prefer the chosen over the reference


def _dpo_rows():
    return [
        {
            "input": {"messages": [{"role": "user", "content": f"Say something nice about {x}."}]},
            "preferred_output": [{"role": "assistant", "content": f"{x} is lovely."}],
            "non_preferred_output": [{"role": "assistant", "content": f"{x} is dull."}],
        }
        for x in ("tea", "rain", "cats", "maps")
    ]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_starts_at_log2_and_learns_the_preference(tiny, tok, tmp_path, method):
    store, _ = tiny
    data = write_jsonl(tmp_path / "dpo.jsonl", _dpo_rows())
    spec = job(
        store, tmp_path, model="tiny-llama", objective="dpo", method=method, training_file=str(data),
        output_name="x", hyperparameters={"batch_size": 4, "micro_batch_size": 2, "learning_rate": 5e-3,
                                          "schedule": "constant"}, lora={"r": 4, "alpha": 8},
    )  # fmt: skip
    examples = load_dataset(data, "dpo", tok, 128)
    torch.manual_seed(0)
    trainer = Trainer(
        prepare_model(load_model(store.path("tiny-llama")), spec), spec, 10, torch.device("cpu")
    )
    batches = [collate(examples[:2]), collate(examples[2:])]
    first = trainer.step(batches, 4)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at the start
    for _ in range(5):
        last = trainer.step(batches, 4)
    assert last["loss"] < first["loss"] - 0.05
    assert last["reward_accuracy"] == 1.0


def test_gradient_accumulation_and_recompute_equal_one_big_batch(tiny, tok, tmp_path):
    store, _ = tiny
    data = write_jsonl(tmp_path / "sft.jsonl", fact_rows())
    examples = load_dataset(data, "sft", tok, 128)[:4]
    results = []
    for micro, recompute in ((4, False), (2, False), (1, False), (2, True)):
        spec = job(
            store, tmp_path, model="tiny-llama", objective="sft", training_file=str(data), output_name="x",
            hyperparameters={"batch_size": 4, "micro_batch_size": micro, "learning_rate": 1e-3,
                             "activation_checkpointing": recompute},
        )  # fmt: skip
        trainer = Trainer(
            prepare_model(load_model(store.path("tiny-llama")), spec), spec, 4, torch.device("cpu")
        )
        parts = [collate(examples[i : i + micro]) for i in range(0, 4, micro)]
        count = sum(e.num_targets for e in examples)
        losses = [trainer.step(parts, count)["loss"] for _ in range(2)]
        results.append((losses, trainer.lm.model.layers[0].mlp.down_proj.weight.detach().clone()))
    for losses, weight in results[1:]:
        assert losses == pytest.approx(results[0][0], rel=1e-5)
        torch.testing.assert_close(weight, results[0][1], atol=1e-6, rtol=1e-5)


def test_lora_adapter_trained_here_loads_with_peft_onto_transformers(tiny, tok, tmp_path):
    from peft import PeftModel

    store, hf = tiny
    data = write_jsonl(
        tmp_path / "text.jsonl", [{"text": f"Document {i}: bright lanterns over the bay."} for i in range(4)]
    )
    spec = job(
        store, tmp_path, model="tiny-llama", objective="pretrain", method="lora", training_file=str(data),
        output_name="tiny-lora", hyperparameters={"batch_size": 2, "micro_batch_size": 2, "learning_rate": 2e-2},
        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]},
    )  # fmt: skip
    examples = load_dataset(data, "pretrain", tok, 64)
    torch.manual_seed(0)
    lm = prepare_model(load_model(store.path("tiny-llama")), spec)
    trainer = Trainer(lm, spec, 3, torch.device("cpu"))
    for _ in range(3):
        trainer.step([collate(examples[:2])], sum(e.num_targets for e in examples[:2]))
    state = adapter_state(lm)
    assert state and all(k.startswith("base_model.model.model.layers.") for k in state)
    store.create_adapter(
        "tiny-lora", "tiny-llama", "test", lambda d: save_adapter(d, state, spec.lora, "tiny-llama")
    )

    ids = torch.tensor(examples[0].segments[0].tokens)
    lm.eval()
    with torch.no_grad():
        ours = lm.compute_logits(lm(ids, torch.arange(len(ids)), _full(len(ids))))
        served_model = load_model(store.path("tiny-lora"))  # base + adapter merged, as a worker serves it
        served = served_model.compute_logits(served_model(ids, torch.arange(len(ids)), _full(len(ids))))
        base = hf(ids[None]).logits[0]
        peft_model = PeftModel.from_pretrained(hf, str(store.path("tiny-lora"))).eval()
        theirs = peft_model(ids[None]).logits[0]
        peft_model.unload()
    assert (theirs - base).abs().max() > 1e-2  # the adapter changed the model
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(served, theirs, atol=1e-4, rtol=1e-4)
    assert store.get("tiny-lora").base_model == "tiny-llama"


def _full(n):
    from shared.models.attention import VarlenAttention

    return VarlenAttention([n])


def test_moe_balance_loss_matches_transformers(tmp_path):
    import transformers

    from tests.tiny_models import BASE, randomize

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        **{**BASE, "num_hidden_layers": 1}, num_local_experts=4, num_experts_per_tok=2
    )
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, 256, (24,))
    with torch.no_grad():
        expected = hf(ids[None], output_router_logits=True).aux_loss
        lm = load_model(tmp_path).train()
        lm(ids, torch.arange(24), _full(24))
        ours = moe_balance_loss(lm)
    assert float(ours) == pytest.approx(float(expected), rel=1e-5)


def test_moe_training_logs_load_and_bias_balancing_moves_toward_uniform(tmp_path, tok, default_model_dir):
    from tests.tiny_models import make_tiny

    store = ModelStore(tmp_path / "store")
    make_tiny("deepseek-moe-dots1", tmp_path / "dots1")
    store.import_checkpoint(tmp_path / "dots1", "dots1")
    make_tiny("mixtral", tmp_path / "mixtral")
    store.import_checkpoint(tmp_path / "mixtral", "mixtral")
    rows = [{"text": "x"}]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    spec = job(
        store, tmp_path, model="dots1", objective="pretrain", training_file=str(data), output_name="x",
        hyperparameters={"batch_size": 1, "micro_batch_size": 1, "learning_rate": 1e-4},
        moe={"aux_loss_coef": 0.01, "bias_update_rate": 0.05},
    )  # fmt: skip
    lm = prepare_model(load_model(store.path("dots1")), spec)
    trainer = Trainer(lm, spec, 2, torch.device("cpu"))
    seq = document_sequences(tok, "tokens for routing " * 8, 256)[0]
    seq = type(seq)(tuple(t % 256 for t in seq.tokens), seq.targets)  # the tiny model's vocabulary
    gates = [m.gate for m in trainer.moes]
    before = [g.e_score_correction_bias.clone() for g in gates]
    metrics = trainer.step([collate([Example((seq,))])], seq.num_targets)
    assert metrics["expert_imbalance"] >= 1.0 and metrics["moe_balance_loss"] > 0
    counts = torch.tensor(metrics["expert_counts"], dtype=torch.float32)  # [layers, E]
    for g, b0, load in zip(gates, before, counts, strict=True):
        moved = g.e_score_correction_bias - b0
        over, under = load > load.mean(), load < load.mean()
        assert (moved[over] < 0).all() and (moved[under] > 0).all()
    with pytest.raises(JobError, match="bias_update_rate"):
        prepare_model(load_model(store.path("mixtral")), spec.model_copy(update={"model": "mixtral"}))


def test_schedules():
    from shared.train.config import Hyperparameters

    cos = lr_multiplier(Hyperparameters(warmup_steps=2, schedule="cosine", min_lr_ratio=0.1), 10)
    assert [round(cos(s), 4) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert cos(9) == pytest.approx(0.1) and cos(5) < cos(3)
    wsd = lr_multiplier(Hyperparameters(warmup_steps=1, schedule="wsd", decay_fraction=0.25), 9)
    assert [wsd(s) for s in range(1, 7)] == [1.0] * 6
    assert wsd(7) == pytest.approx(0.5) and wsd(8) == pytest.approx(0.0)


def test_bad_datasets_name_file_and_line(tmp_path, tok):
    def check(name, text, objective, match):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(DatasetError, match=match):
            load_dataset(path, objective, tok, 256)

    good = json.dumps(fact_rows()[0])
    check("empty.jsonl", "\n\n", "sft", r"empty\.jsonl: the training file is empty")
    check("bad.jsonl", good + "\n{not json}\n", "sft", r"bad\.jsonl:2: not valid JSON")
    check("schema.jsonl", good + "\n" + json.dumps({"prompt": "hi", "completion": "yo"}), "sft",
          r"schema\.jsonl:2: an SFT line needs 'messages'")  # fmt: skip
    check("role.jsonl", json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "sft",
          r"role\.jsonl:1: messages\[0\]\.role must be one of")  # fmt: skip
    check("noasst.jsonl", good + "\n" + good + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
          "sft", r"noasst\.jsonl:3: the conversation has no assistant turn")  # fmt: skip
    check("text.jsonl", json.dumps({"txt": "x"}), "pretrain", r"text\.jsonl:1: a pretraining line needs")
    check("dpo.jsonl", json.dumps({"input": {"messages": [{"role": "user", "content": "q"}]},
                                   "preferred_output": [{"role": "assistant", "content": "a"}]}),
          "dpo", r"dpo\.jsonl:1: a DPO line needs 'non_preferred_output'")  # fmt: skip
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "missing.jsonl", "sft", tok, 256)


def test_bad_job_specs_name_the_field(tmp_path):
    base = {"model": "m", "objective": "sft", "training_file": "t.jsonl", "output_name": "o"}
    cases = [
        ({"objective": "rlhf"}, r"objective: Input should be 'pretrain', 'sft' or 'dpo'"),
        ({"hyperparameters": {"learning_rate": -1}}, r"hyperparameters\.learning_rate: .*greater than 0"),
        ({"hyperparameters": {"lr": 1}}, r"hyperparameters\.lr: unknown field"),
        ({"scaling": {"num_workers": 3}}, r"batch_size \(8\) must divide by scaling\.num_workers \(3\)"),
        ({"scaling": {"strategy": "fsdp"}}, r"scaling: strategy fsdp needs use_gpu"),
        ({"output_name": None}, r"output_name: "),
    ]
    for change, match in cases:
        with pytest.raises(JobError, match=match):
            parse_job({**base, **change})
    with pytest.raises(JobError, match="model: required field is missing"):
        parse_job({k: v for k, v in base.items() if k != "model"})
