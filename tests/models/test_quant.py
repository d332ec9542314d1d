"""Weight-only quantization: the integer layout against a dequantized reference (per layer), the CPU
kernel against the PyTorch path, the GGUF's own Q4_1 / Q8_0 integers reproducing the float model's
greedy tokens exactly (on the kernels' whole-step stack and on the PyTorch path), `tandem models
quantize`, and what is refused."""

from __future__ import annotations

import json

import pytest
import torch

from services.platform.cli.main import main
from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.kernels import cpu_ops
from shared.models import quant
from shared.store import ModelStore
from shared.store.builtin import BUILTIN
from shared.store.quantize import layer_errors

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three fruits."]


@pytest.mark.parametrize("bits, group", [(8, 64), (8, 128), (4, 32), (4, 64)])
def test_integers_stand_for_the_weight_within_half_a_step(bits, group):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48, bias=True)
    q = quant.quantize_linear(lin, bits, group)
    w = lin.weight.detach()
    step = q.scales.repeat_interleave(group, dim=1)
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()
    for t in (q.scales, q.offsets):  # float16 values: the kernels read float16 copies exactly
        torch.testing.assert_close(t.half().float(), t, rtol=0, atol=0)
    x = torch.randn(5, 128)
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, q.dequantize(), lin.bias))
    again = quant.quantize_linear(
        torch.nn.Linear(128, 48), bits, group
    )  # values on the grid come back exactly
    again.qweight.copy_(q.qweight), again.scales.copy_(q.scales), again.offsets.copy_(q.offsets)
    torch.testing.assert_close(again.dequantize(), q.dequantize(), rtol=0, atol=0)


def test_fused_layers_compute_the_parts_side_by_side():
    parts = [quant.quantize_linear(torch.nn.Linear(64, n, bias=False), 4, 32) for n in (32, 16, 16)]
    x = torch.randn(3, 64)
    torch.testing.assert_close(quant.fuse(parts)(x), torch.cat([p(x) for p in parts], dim=1))


@pytest.mark.skipif(cpu_ops() is None, reason="the CPU kernels are not built here")
@pytest.mark.parametrize(
    "bits, group, shape",
    [(8, 576, (576, 200)), (8, 32, (576, 200)), (4, 32, (576, 200)), (4, 64, (576, 200)),
     # the 4-bit mask path takes blocks of 64 (AVX2) or 128 columns (AVX-512, where 576 ends in half a
     # block): groups over several blocks, a tail row beyond the tiles, and a width that is not whole
     # blocks (the table or widening path)
     (4, 192, (576, 203)), (4, 256, (768, 203)), (4, 32, (544, 203))],
)  # fmt: skip
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
def test_the_kernel_matches_the_dequantized_reference(bits, group, shape, scale_dtype):
    ops = cpu_ops()
    torch.manual_seed(1)
    k_dim, n_dim = shape
    q = quant.quantize_linear(torch.nn.Linear(k_dim, n_dim, bias=False), bits, group)
    scales, offsets = q.scales.to(scale_dtype), q.offsets.to(scale_dtype)
    for rows in (1, 2, 3, 4, 5, 17, 64, 100):  # register tiles, then converted blocks (batches, prefill)
        x = torch.randn(rows, k_dim)
        want = x @ q.dequantize().t()
        got = ops.quant_linear(x, q.qweight, scales, offsets, bits, group)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="float32 or both float16"):
        ops.quant_linear(torch.randn(1, 576), q.qweight, q.scales.half(), q.offsets, bits, group)


@pytest.mark.skipif(cpu_ops() is None, reason="the CPU kernels are not built here")
@pytest.mark.parametrize("group, k_dim", [(32, 576), (32, 544), (64, 576), (128, 768)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
def test_few_rows_keep_float32_precision_where_x_has_outliers(group, k_dim, scale_dtype):
    """1-4 rows of x (where AVX-512 VNNI takes x as 24-bit integers with a power-of-two scale per 8
    columns): against a float64 reference, the error stays within 2^-16 of sum |x| |w| (float32's
    own summation comes to ~2^-21 here), with an outlier channel 300x the rest, tiny values beside
    it, a zero group and a group near 1e-30."""
    ops = cpu_ops()
    torch.manual_seed(3)
    q = quant.quantize_linear(torch.nn.Linear(k_dim, 96, bias=False), 4, group)
    w = q.dequantize().double()
    for rows in (1, 2, 3, 4, 5):
        x = torch.randn(rows, k_dim)
        x[:, 5] *= 300
        x[:, 40:50] *= 1e-4
        x[:, 64:96] = 0
        x[:, 100:132] *= 1e-30
        want = x.double() @ w.t()
        got = ops.quant_linear(x, q.qweight, q.scales.to(scale_dtype), q.offsets.to(scale_dtype), 4, group)
        bound = (x.double().abs() @ w.abs().t()) * 2**-16
        assert ((got.double() - want).abs() <= bound).all(), ((got.double() - want).abs() / bound).max()


@pytest.mark.skipif(cpu_ops() is None, reason="the CPU kernels are not built here")
@pytest.mark.parametrize("bits, group", [(4, 32), (4, 64), (8, 32)])
def test_a_nan_or_infinity_in_x_spoils_only_its_own_row(bits, group):
    ops = cpu_ops()
    torch.manual_seed(4)
    q = quant.quantize_linear(torch.nn.Linear(576, 64, bias=False), bits, group)
    for rows in (1, 2, 4, 5):
        for bad in (float("nan"), float("inf")):
            x = torch.randn(rows, 576)
            x[0, 77] = bad
            got = ops.quant_linear(x, q.qweight, q.scales.half(), q.offsets.half(), bits, group)
            assert not got[0].isfinite().any()
            want = x[1:] @ q.dequantize().t()
            torch.testing.assert_close(got[1:], want, rtol=1e-4, atol=1e-4)


def _has_int8_dots() -> bool:
    """Integer dot products for int8 activations: AVX-512 VNNI, or AVX2's vpmaddubsw."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx2" in flags


NEEDS_INT8_DOTS = pytest.mark.skipif(
    cpu_ops() is None or not _has_int8_dots(), reason="needs the CPU kernels and AVX2 or AVX-512 VNNI"
)


@NEEDS_INT8_DOTS
@pytest.mark.parametrize("bits, group", [(8, 576), (8, 32), (4, 32), (4, 64)])
def test_int8_activations_stay_close_to_the_reference(bits, group):
    """int8_x: x quantized per 32 columns, integer dot products for 1-4 rows (the float path beyond)."""
    ops = cpu_ops()
    torch.manual_seed(2)
    q = quant.quantize_linear(torch.nn.Linear(576, 200, bias=False), bits, group)
    for rows in (1, 2, 3, 4, 5, 17):
        x = torch.randn(rows, 576)
        want = x @ q.dequantize().t()
        got = ops.quant_linear(x, q.qweight, q.scales, q.offsets, bits, group, True)
        halves = ops.quant_linear(x, q.qweight, q.scales.half(), q.offsets.half(), bits, group, True)
        torch.testing.assert_close(halves, got, rtol=1e-5, atol=1e-5)  # float16 scales, same values
        exact = ops.quant_linear(x, q.qweight, q.scales, q.offsets, bits, group)
        err = ((got - want).norm() / want.norm()).item()
        if rows <= 4:
            assert 0 < err < 0.03, err  # int8 rounding of x (~0.5 %), amplified where offsets cancel
        else:
            torch.testing.assert_close(got, exact, rtol=0, atol=0)


@pytest.fixture(scope="module")
def kept(tmp_path_factory, store):
    """The built-in model's GGUF imported with its Q4_1 / Q8_0 integers kept."""
    root = tmp_path_factory.mktemp("quant")
    s = ModelStore(root)
    s.import_gguf(BUILTIN["smollm2-135m-instruct"].locate(), "smollm2-q4", keep_quantized=True)
    return s.path("smollm2-q4")


@pytest.mark.parametrize("kernels", [True, False])
def test_the_gguf_integers_reproduce_the_float_model(kept, default_model_dir, kernels):
    cfg = json.loads((kept / "config.json").read_text())["quantization_config"]
    assert (cfg["bits"], cfg["group_size"], cfg["head_bits"]) == (4, 32, 8)
    ref = LLMEngine.from_store(default_model_dir, EngineConfig())
    engine = LLMEngine.from_store(kept, EngineConfig(cpu_kernels=kernels))
    assert sum(isinstance(m, quant.QuantLinear) for m in engine.model.modules()) == 30 * 4 + 1  # fused + head
    assert (engine.runner.cpu_stack is not None) == (kernels and engine.runner.kernels is not None)
    prompts = [ref.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(max_tokens=24, temperature=0)
    want = [o.output_token_ids for o in ref.generate(prompts, params)]
    assert [o.output_token_ids for o in engine.generate(prompts, params)] == want
    assert [o.output_token_ids for o in engine.generate(prompts[:1], params)] == want[:1]  # one-row steps


def test_steps_of_one_to_four_decodes_reproduce_the_float_model(kept, default_model_dir):
    """Requests finishing one after another: the one-team decode steps of 4, 3, 2 and 1 tokens (on
    AVX-512 VNNI, the weights' rows16 copy: one token's blocks of 16 rows, or rows of the blocks for
    more) give the float model's greedy tokens."""
    ref = LLMEngine.from_store(default_model_dir, EngineConfig())
    engine = LLMEngine.from_store(kept, EngineConfig())
    questions = [*QUESTIONS, "Name a colour."]
    prompts = [ref.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in questions]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (20, 5, 15, 10)]
    want = [o.output_token_ids for o in ref.generate(prompts, params)]
    assert [o.output_token_ids for o in engine.generate(prompts, params)] == want
    assert engine.pool.num_free == engine.pool.num_blocks


@NEEDS_INT8_DOTS
def test_int8_activations_through_the_engine(kept, default_model_dir):
    """The whole-step stack with int8 activations: greedy text that starts as the float model's does
    and, where it leaves it, leaves it only between near-ties: scored by the float model, every token
    it picks is within a small margin of that step's best (the arithmetic is no longer the dequantized
    model's, so a near-tie may go the other way; a broken kernel picks tokens far from the best).
    Sound kernels gave margins up to 0.74 here: a change of float summation order alone moves which
    near-tie wins, and the text then runs on differently (the per-layer error tests bound the sums).
    Most picks must still be the float model's own best (36 of 40 here)."""
    from shared.models.attention import VarlenAttention

    ref = LLMEngine.from_store(default_model_dir, EngineConfig())
    engine = LLMEngine.from_store(kept, EngineConfig(int8_activations=True))
    assert engine.runner.cpu_stack.int8_x
    prompts = [ref.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(max_tokens=16, temperature=0)
    want = [o.output_token_ids for o in ref.generate(prompts, params)]
    got = [o.output_token_ids for o in engine.generate(prompts, params)]
    assert [g[:1] for g in got] == [w[:1] for w in want]
    margins = []
    for prompt, tokens in zip(prompts, got, strict=True):
        ids = torch.tensor(prompt + tokens)
        with torch.inference_mode():
            hidden = ref.model(ids, torch.arange(len(ids)), VarlenAttention([len(ids)]))
            logits = ref.model.compute_logits(hidden)[len(prompt) - 1 : -1]
        picked = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        margins += (logits.max(dim=1).values - picked).tolist()
    assert max(margins) < 1.0, margins
    assert sum(m == 0 for m in margins) >= 0.75 * len(margins), margins
    assert engine.pool.num_free == engine.pool.num_blocks


def test_tandem_models_quantize_int8(tmp_path, default_model_dir, capsys):
    s = ModelStore(tmp_path)
    s.import_checkpoint(default_model_dir, "fp32")
    assert (
        main(["models", "--store", str(tmp_path), "quantize", "fp32", "--bits", "8", "--name", "int8"]) == 0
    )
    errors = layer_errors(s.path("fp32"), s.path("int8"))
    assert len(errors) == 30 * 7 + 1 and max(errors.values()) < 0.01  # per channel: half a step of 1/127
    ref = LLMEngine.from_store(s.path("fp32"), EngineConfig())
    engine = LLMEngine.from_store(s.path("int8"), EngineConfig())
    prompt = ref.tokenizer.encode_chat([{"role": "user", "content": QUESTIONS[0]}])
    params = SamplingParams(max_tokens=8, temperature=0)
    assert engine.generate([prompt], params)[0].text == ref.generate([prompt], params)[0].text
    capsys.readouterr()
    assert (
        main(["models", "--store", str(tmp_path), "quantize", "int8", "--bits", "4", "--name", "again"]) == 1
    )
    assert "quantized already" in capsys.readouterr().err
    assert (
        main(["models", "--store", str(tmp_path), "import", str(default_model_dir), "--keep-quantized"]) == 1
    )
    assert "--keep-quantized applies to GGUF" in capsys.readouterr().err
    assert not s.has("again")
