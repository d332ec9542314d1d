"""Model store imports: atomic, validated, with errors that name the problem, through the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from services.platform.cli.main import main as tandem_main
from shared.models.attention import VarlenAttention
from shared.models.loader import load_model
from shared.store import ModelStore, StoreError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("src") / "tiny-llama"
    model.save_pretrained(path)
    return path, model


def _clean(root) -> bool:
    """Nothing half-written: no staging leftovers, no model directories without metadata."""
    staging = root / ".staging"
    leftovers = list(staging.iterdir()) if staging.exists() else []
    partial = [p for p in root.iterdir() if p.name != ".staging" and not (p / "tandem.json").is_file()]
    return not leftovers and not partial


def _broken_copy(src, tmp_path, name="broken"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _cli(root, *args) -> int:
    return tandem_main(["models", "--store", str(root), *args])


def test_import_list_and_load(tiny_llama, tmp_path, capsys):
    src, ref = tiny_llama
    root = tmp_path / "store"
    assert _cli(root, "import", str(src), "--name", "tiny") == 0
    assert _cli(root, "import", str(src), "--name", "tiny", "--if-missing") == 0
    capsys.readouterr()
    assert _cli(root, "list") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "ARCHITECTURE", "PARAMS", "DTYPE", "SIZE", "BASE"]
    assert out[1].split()[-1] == "-"  # a full model, not an adapter
    assert out[1].split()[:2] == ["tiny", "LlamaForCausalLM"]
    info = ModelStore(root).get("tiny")
    assert info.num_parameters == sum(p.numel() for p in ref.parameters())
    assert info.dtype == "f32" and not info.has_tokenizer
    ours = load_model(root / "tiny")
    ids = torch.arange(10)
    with torch.no_grad():
        got = ours.compute_logits(ours(ids, torch.arange(10), VarlenAttention([10])))
        assert torch.allclose(got, ref(ids[None]).logits[0], atol=1e-5)


def test_sharded_checkpoint_imports(tiny_llama, tmp_path):
    _, ref = tiny_llama
    src = tmp_path / "sharded"
    ref.save_pretrained(src, max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").is_file()
    store = ModelStore(tmp_path / "store")
    store.import_checkpoint(src, "sharded")
    assert len(list((tmp_path / "store" / "sharded").glob("model-*.safetensors"))) > 1
    ours = load_model(tmp_path / "store" / "sharded")
    with torch.no_grad():
        got = ours.compute_logits(ours(torch.arange(6), torch.arange(6), VarlenAttention([6])))
        assert torch.allclose(got, ref(torch.arange(6)[None]).logits[0], atol=1e-5)


def _expect_failure(root, src, match):
    store = ModelStore(root)
    with pytest.raises(StoreError, match=match):
        store.import_checkpoint(src, "bad")
    assert not store.has("bad") and not (root / "bad").exists()
    assert _clean(root)


def test_missing_config(tiny_llama, tmp_path):
    src = _broken_copy(tiny_llama[0], tmp_path)
    (src / "config.json").unlink()
    _expect_failure(tmp_path / "store", src, "config.json is missing")


def test_missing_weights(tiny_llama, tmp_path):
    src = _broken_copy(tiny_llama[0], tmp_path)
    (src / "model.safetensors").unlink()
    _expect_failure(tmp_path / "store", src, "no model.safetensors")


def test_an_index_naming_a_file_outside_the_model_is_refused(tiny_llama, tmp_path):
    src = _broken_copy(tiny_llama[0], tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    (src / "model.safetensors").rename(outside)
    index = {"weight_map": {"model.embed_tokens.weight": "../elsewhere.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect_failure(tmp_path / "store", src, "outside the model directory")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights(tiny_llama, tmp_path, damage):
    src = _broken_copy(tiny_llama[0], tmp_path)
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x13\x00garbage" * 100)
    _expect_failure(tmp_path / "store", src, "not a readable safetensors file")


def test_invalid_config_json(tiny_llama, tmp_path):
    src = _broken_copy(tiny_llama[0], tmp_path)
    (src / "config.json").write_text("{not json")
    _expect_failure(tmp_path / "store", src, "not valid JSON")


def test_unsupported_architecture(tiny_llama, tmp_path):
    src = _broken_copy(tiny_llama[0], tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    _expect_failure(tmp_path / "store", src, "cannot run 'GPT2LMHeadModel'.*not a supported architecture")
    cfg["architectures"] = ["DeepseekV3ForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    _expect_failure(tmp_path / "store", src, "Multi-head Latent Attention")


def test_shape_mismatch_names_the_tensor(tiny_llama, tmp_path):
    src = _broken_copy(tiny_llama[0], tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (src / "config.json").write_text(json.dumps(cfg))
    _expect_failure(tmp_path / "store", src, r"mlp\.(gate|up|down)_proj\.weight' has shape .* implies")


def test_missing_and_unexpected_tensors(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    src = _broken_copy(tiny_llama[0], tmp_path)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, src / "model.safetensors")
    _expect_failure(
        tmp_path / "store", src, r"missing tensor for 'model\.layers\.1\.self_attn\.k_proj\.weight'"
    )
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 32)
    tensors["model.layers.0.mystery.weight"] = torch.zeros(3)
    save_file(tensors, src / "model.safetensors")
    _expect_failure(tmp_path / "store", src, "unexpected tensor 'model.layers.0.mystery.weight'")


def test_bad_gguf_and_unknown_source(tmp_path, capsys):
    root = tmp_path / "store"
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"definitely not gguf")
    assert _cli(root, "import", str(fake)) == 1
    assert "not a readable GGUF file" in capsys.readouterr().err
    assert _cli(root, "import", "no-such-model") == 1
    err = capsys.readouterr().err
    assert err.startswith("tandem: error:") and "built-in: smollm2-135m-instruct" in err
    assert _clean(root) if root.exists() else True


def test_duplicate_and_invalid_names(tiny_llama, tmp_path, capsys):
    root = tmp_path / "store"
    assert _cli(root, "import", str(tiny_llama[0]), "--name", "dup") == 0
    assert _cli(root, "import", str(tiny_llama[0]), "--name", "dup") == 1
    assert "already exists" in capsys.readouterr().err
    assert _cli(root, "import", str(tiny_llama[0]), "--name", "../escape") == 1
    assert "invalid model name" in capsys.readouterr().err
    assert _clean(root)
    assert _cli(root, "remove", "dup") == 0 and not (root / "dup").exists()
