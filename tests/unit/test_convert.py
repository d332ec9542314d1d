"""SamplingParams crosses gRPC field by field: the conversions are derived from the dataclass, so a
value set on every field comes back unchanged (a new field without a value here fails the test), the
defaults round-trip, and an unset max_tokens means up to the context length — which the engine
resolves — instead of silently becoming 16."""

from __future__ import annotations

import dataclasses

import pytest

from shared.core.sampling_params import SamplingParams
from shared.rpc.convert import params_from_proto, params_to_proto
from tandem.v1 import common_pb2

EVERY_FIELD = SamplingParams(
    max_tokens=7,
    temperature=0.5,
    top_p=0.875,
    top_k=5,
    min_p=0.125,
    repetition_penalty=1.25,
    frequency_penalty=0.375,
    presence_penalty=-0.5,
    logit_bias=((3, 1.5), (9, -2.0)),
    min_tokens=2,
    stop_token_ids=(4, 5),
    ignore_eos=True,
    seed=-123,
    logprobs=0,
    stop=("x", "yz"),
    include_stop_str_in_output=True,
    skip_special_tokens=False,
    priority=-2,
    cache_salt="tenant",
    grammar='start: "yes" | "no"',
    speculative="ngram",
    speculative_tokens=3,
)  # fmt: skip (values exact in float32)


def test_every_field_round_trips():
    default = SamplingParams()
    unset = [
        f.name
        for f in dataclasses.fields(SamplingParams)
        if getattr(EVERY_FIELD, f.name) == getattr(default, f.name)
    ]
    assert not unset, f"give these fields a non-default value here: {unset}"
    assert params_from_proto(params_to_proto(EVERY_FIELD)) == EVERY_FIELD
    assert params_from_proto(params_to_proto(default)) == default
    assert set(common_pb2.SamplingParams.DESCRIPTOR.fields_by_name) == {
        f.name for f in dataclasses.fields(SamplingParams)
    }


def test_an_unset_max_tokens_runs_to_the_context_length(tmp_path):
    from shared.engine import EngineConfig, LLMEngine
    from shared.models.loader import load_model
    from tests.tiny_models import make_tiny

    params = params_from_proto(common_pb2.SamplingParams(temperature=0))
    assert params.max_tokens is None and params.temperature == 0
    make_tiny("llama", tmp_path / "tiny")  # max_position_embeddings 256
    engine = LLMEngine(load_model(tmp_path / "tiny"), EngineConfig(num_blocks=128, block_size=4))
    out = engine.generate([[1, 2, 3]], dataclasses.replace(params, ignore_eos=True))[0]
    assert len(out.output_token_ids) == 256 - 3 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="fills the context length of 256"):
        engine.generate([[1] * 256], params)


def test_the_cli_has_a_flag_per_field_and_they_round_trip():
    import argparse

    from services.platform.cli.generate import NOT_FLAGS, add_sampling_args, sampling_params

    parser = argparse.ArgumentParser()
    add_sampling_args(parser, max_tokens=64, temperature=0.7)
    argv = []
    for f in dataclasses.fields(SamplingParams):
        value, flag = getattr(EVERY_FIELD, f.name), "--" + f.name.replace("_", "-")
        if f.name in NOT_FLAGS:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            argv += [a for v in value for a in (flag, str(v))]
        else:
            argv += [flag, str(value)]
    want = dataclasses.replace(EVERY_FIELD, logit_bias=())
    assert sampling_params(parser.parse_args(argv), vocab_size=100) == want
    assert sampling_params(parser.parse_args([]), 100) == SamplingParams(max_tokens=64, temperature=0.7)
