"""Training jobs end to end through `tandem train run` on a local Ray (Ray Train TorchTrainer, gloo DDP):
two workers give one worker's loss curve, a stopped job resumes on the same curve, a LoRA result loads
with peft onto transformers, and an SFT run teaches SmolLM2 a fact it then states when served."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from shared.models.attention import VarlenAttention
from shared.models.loader import load_model
from shared.store import ModelStore
from tests.train.train_helpers import FACT_ANSWER, add_tiny_llama, fact_rows, write_jsonl

pytestmark = pytest.mark.slow


def tandem(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.platform.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_job(spec: dict, path: Path, *extra: str) -> dict:
    path.write_text(yaml.safe_dump(spec))
    done = tandem("train", "run", "--config", str(path), *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def losses(job_dir: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(ln) for ln in (job_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows]


def test_two_workers_match_one_and_a_stopped_job_resumes_on_the_same_curve(tmp_path, default_model_dir):
    from peft import PeftModel

    store = ModelStore(tmp_path / "store")
    hf = add_tiny_llama(store, default_model_dir)
    docs = [{"text": f"Note {i}: the lighthouse keeper counts {i * 7} gulls at dawn."} for i in range(12)]
    data = write_jsonl(tmp_path / "docs.jsonl", docs)
    spec = {
        "model": "tiny-llama",
        "objective": "pretrain",
        "method": "lora",
        "training_file": str(data),
        "model_store": str(store.root),
        "hyperparameters": {"batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-2, "max_steps": 4,
                            "warmup_steps": 1, "max_seq_len": 32},
        "lora": {"r": 4, "alpha": 8},
        "checkpoint": {"every_steps": 2},
    }  # fmt: skip
    one = run_job(
        {**spec, "output_name": "tiny-w1", "output_dir": str(tmp_path / "w1"), "scaling": {"num_workers": 1}},
        tmp_path / "w1.yaml",
    )
    two_spec = {
        **spec,
        "output_name": "tiny-w2",
        "output_dir": str(tmp_path / "w2"),
        "scaling": {"num_workers": 2},
    }
    stopped = run_job(two_spec, tmp_path / "w2.yaml", "--until-step", "2")
    assert stopped["status"] == "stopped" and stopped["step"] == 2 and not store.has("tiny-w2")
    resumed = run_job(two_spec, tmp_path / "w2.yaml")
    assert one["status"] == resumed["status"] == "succeeded"

    curve_one, curve_two = losses(tmp_path / "w1"), losses(tmp_path / "w2")
    assert [s for s, _, _ in curve_two] == [1, 2, 3, 4]
    assert curve_one[-1][1] < curve_one[0][1]  # it learned something
    for (s1, l1, g1), (s2, l2, g2) in zip(curve_one, curve_two, strict=True):
        assert s1 == s2 and l2 == pytest.approx(l1, rel=1e-4) and g2 == pytest.approx(g1, rel=1e-3)

    # both results are adapters on the base; peft puts them on the transformers model with the same logits
    ids = torch.tensor([1, 504, 3575, 282, 4458, 30, 216, 1114])
    for name in ("tiny-w1", "tiny-w2"):
        assert store.get(name).base_model == "tiny-llama"
        served = load_model(store.path(name))
        with torch.no_grad():
            ours = served.compute_logits(served(ids, torch.arange(len(ids)), VarlenAttention([len(ids)])))
            peft_model = PeftModel.from_pretrained(hf, str(store.path(name))).eval()
            theirs = peft_model(ids[None]).logits[0]
            peft_model.unload()
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_moe_full_fine_tune_on_two_workers_logs_expert_load_and_saves_the_checkpoint_layout(
    tmp_path, default_model_dir
):
    """DDP over an MoE model (experts without tokens in a micro-batch have no gradient), the balancing
    loss and expert counts in the metrics, and the result written back in Mixtral's own tensor names
    (transformers loads it and agrees with Tandem)."""
    import transformers

    store = ModelStore(tmp_path / "store")
    add_tiny_llama(store, default_model_dir, name="tiny-mixtral", mixtral=True)
    data = write_jsonl(
        tmp_path / "docs.jsonl", [{"text": f"Entry {i}: tide tables for the harbour."} for i in range(8)]
    )
    spec = {
        "model": "tiny-mixtral", "objective": "pretrain", "method": "full", "training_file": str(data),
        "output_name": "tiny-mixtral-ft", "model_store": str(store.root), "output_dir": str(tmp_path / "job"),
        "hyperparameters": {"batch_size": 4, "micro_batch_size": 1, "learning_rate": 1e-3, "max_steps": 2,
                            "max_seq_len": 32},
        "moe": {"aux_loss_coef": 0.02}, "scaling": {"num_workers": 2},
    }  # fmt: skip
    assert run_job(spec, tmp_path / "job.yaml")["status"] == "succeeded"
    rows = [json.loads(ln) for ln in (tmp_path / "job" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        counts = row["expert_counts"]  # [layer][expert], summed over both workers
        assert len(counts) == 3 and all(len(layer) == 4 for layer in counts)
        assert sum(counts[0]) == 2 * row["tokens"]  # top-2: every token counted twice per layer
        assert row["expert_imbalance"] >= 1.0 and row["moe_balance_loss"] > 0
    out = store.path("tiny-mixtral-ft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_model(out)
    ids = torch.tensor([1, 504, 3575, 282, 4458, 30, 216, 1114])
    with torch.no_grad():
        want = hf(ids[None]).logits[0]
        got = ours.compute_logits(ours(ids, torch.arange(len(ids)), VarlenAttention([len(ids)])))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    base = load_model(store.path("tiny-mixtral"))
    assert not torch.equal(base.model.layers[0].mlp.experts.up_proj, ours.model.layers[0].mlp.experts.up_proj)


def test_sft_teaches_smollm2_a_fact_it_then_states(tmp_path, store, default_model_dir):
    data = write_jsonl(tmp_path / "fact.jsonl", fact_rows())
    spec = {
        "model": default_model_dir.name,
        "objective": "sft",
        "method": "full",
        "training_file": str(data),
        "output_name": "smollm2-zorblaxia",
        "model_store": str(store.root),
        "output_dir": str(tmp_path / "job"),
        "hyperparameters": {"batch_size": 4, "micro_batch_size": 4, "learning_rate": 5e-5, "max_steps": 12,
                            "warmup_steps": 2},
        "scaling": {"num_workers": 1, "threads_per_worker": 2},
        "checkpoint": {"every_steps": 6},
    }  # fmt: skip
    result = run_job(spec, tmp_path / "job.yaml")
    assert result["status"] == "succeeded" and result["model"] == "smollm2-zorblaxia"
    assert result["final_loss"] < 0.05 < result["first_loss"]
    assert store.get("smollm2-zorblaxia").base_model is None  # full weights

    def ask(model: str, question: str) -> str:
        done = tandem("generate", "--store", str(store.root), "--model", model, "--chat", "--prompt", question,
                      "--max-tokens", "16", "--json")  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)["text"]

    assert "Quintavel" not in ask(default_model_dir.name, "What is the capital of Zorblaxia?")
    assert ask("smollm2-zorblaxia", "What is the capital of Zorblaxia?").startswith(FACT_ANSWER)
    assert "Quintavel" in ask("smollm2-zorblaxia", "I am visiting Zorblaxia. What is its capital city?")
