"""Training benchmark: optimizer steps per second of Tandem's trainer vs a plain transformers + torch
loop on the same model, batch and optimizer, full fine-tuning and LoRA, plus MFU.

    .venv/bin/python -m tests.bench.training [--quick]

Both sides train SmolLM2-135M-Instruct (fp32, the same store checkpoint) on the same batch: 4
sequences × 256 tokens of text (128 with --quick), every token a target, AdamW, gradient clipping 1.0.
  tandem  shared.train.trainer.Trainer.step on the flat packed batch (VarlenAttention), the step a
          Ray Train worker runs
  hf      transformers' LlamaForCausalLM(input_ids, labels) → loss.backward → clip → AdamW.step
  LoRA    r = 16 on q/k/v/o/gate/up/down: Tandem through peft on its own modules, the baseline
          through peft's get_peft_model on the transformers model
Each side runs 1 warm-up step then `repeats` timed steps, alternating sides; the best step counts.
tok/s = tokens per step / step time. MFU = achieved FLOP/s / the measured fp32 matmul peak, with
FLOPs per token = 6 · parameters + 12 · layers · hidden · sequence length (PaLM's estimate; a LoRA
step skips the frozen weights' gradients, so its MFU uses 4 · parameters instead of 6).
"""

from __future__ import annotations

import time

import torch

from shared.models.loader import load_model
from shared.train.config import parse_job
from shared.train.data import Example, Sequence, collate
from shared.train.trainer import Trainer, prepare_model
from tests.bench.common import emit, environment, log, model_path, parser

BATCH = 4


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def tandem_side(path, method: str, ids: torch.Tensor):
    spec = parse_job(
        {
            "model": path.name, "objective": "pretrain", "method": method, "training_file": "unused",
            "output_name": "bench", "hyperparameters": {"batch_size": BATCH, "micro_batch_size": BATCH,
            "learning_rate": 1e-5, "schedule": "constant", "max_grad_norm": 1.0},
            "lora": {"r": 16, "alpha": 32},
        }
    )  # fmt: skip
    torch.manual_seed(0)
    trainer = Trainer(prepare_model(load_model(path), spec), spec, 1000, torch.device("cpu"))
    seqs = [Sequence(tuple(row.tolist()), (False,) + (True,) * (len(row) - 1)) for row in ids]
    batch = collate([Example((s,)) for s in seqs])
    count = sum(s.num_targets for s in seqs)
    return lambda: trainer.step([batch], count)["loss"]


def hf_side(path, method: str, ids: torch.Tensor):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

    return step


def timed(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    best, value = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return best, value


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(args.threads)
    path = model_path(args)
    seq_len = 128 if args.quick else 256
    repeats = args.repeats or (2 if args.quick else 3)
    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (BATCH, seq_len))
    tokens = BATCH * seq_len
    peak = matmul_peak()
    log(f"matmul peak {peak / 1e9:.1f} GFLOP/s; {BATCH}×{seq_len} tokens per step, best of {repeats}")

    results: dict = {}
    for method, prefix in (("full", ""), ("lora", "lora_")):
        tandem_step, hf_step = tandem_side(path, method, ids), hf_side(path, method, ids)
        t_tandem, loss_tandem = timed(tandem_step, repeats)
        t_hf, loss_hf = timed(hf_step, repeats)
        log(
            f"{method}: tandem {t_tandem:.2f} s/step (loss {loss_tandem:.3f}), hf {t_hf:.2f} s/step (loss {loss_hf:.3f})"
        )
        results[f"{prefix}tandem_tok_s"] = round(tokens / t_tandem, 1)
        results[f"{prefix}hf_tok_s"] = round(tokens / t_hf, 1)
        results[f"{prefix}ratio"] = round(t_hf / t_tandem, 3)
        del tandem_step, hf_step

    model = load_model(path)
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    attention = 12 * cfg.num_layers * cfg.hidden_size * seq_len
    results["mfu"] = round((6 * n_params + attention) * results["tandem_tok_s"] / peak, 4)
    results["lora_mfu"] = round((4 * n_params + attention) * results["lora_tandem_tok_s"] / peak, 4)
    results["hf_mfu"] = round((6 * n_params + attention) * results["hf_tok_s"] / peak, 4)
    results["matmul_peak_gflop_s"] = round(peak / 1e9, 1)
    results["tokens_per_step"] = tokens
    results.update(environment(args))
    emit(results)


if __name__ == "__main__":
    main()
