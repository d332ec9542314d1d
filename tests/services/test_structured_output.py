"""Structured output through the gateway with the official `openai` SDK: response_format JSON that
validates against its schema for many seeds (streamed or not, beside unconstrained requests in the
same batch), tool calls parsed into `tool_calls` (named, required, and the Hermes blocks of auto),
vLLM's guided extras, and a clear 400 for what cannot be honoured. Also the engine alone: the mask
keeps greedy and seeded outputs inside the grammar, leaves other rows untouched, and survives a
prefill → decode handoff."""

from __future__ import annotations

import concurrent.futures
import json

import jsonschema
import openai
import pytest

from services.gateway.structured import JSON_OPTIONS, Structure
from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.store import DEFAULT_MODEL

pytestmark = pytest.mark.slow
MODEL = DEFAULT_MODEL
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "Berlin", "Tokyo"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"type": "string", "maxLength": 30}},
            "required": ["tz"],
            "additionalProperties": False,
        },  # fmt: skip
    },
}
ASK = [{"role": "user", "content": "Describe a person as JSON: name, age and city."}]
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def stack(platform, store, default_model_dir):
    tokenizer = platform.start_tokenizer(store)
    worker, worker_service = platform.start_worker(default_model_dir)
    router, _ = platform.start_router([worker.address])
    return {"url": platform.start_gateway(tokenizer.address, router.address), "worker": worker_service}


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack["url"] + "/v1", api_key="unused", max_retries=0)


def person_format(strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": strict}}


def test_json_schema_output_validates_for_many_seeds_beside_free_requests(idle, client, stack):
    def constrained(seed):
        return client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            temperature=1.0,
            seed=seed,
            max_tokens=80,
            response_format=person_format(),
        )

    def free(seed):
        return client.chat.completions.create(
            model=MODEL, messages=ASK, temperature=1.0, seed=seed, max_tokens=40
        )

    with concurrent.futures.ThreadPoolExecutor(12) as pool:  # constrained and free rows share batches
        done = [pool.submit(constrained, s) for s in range(8)] + [pool.submit(free, s) for s in range(4)]
        results = [f.result() for f in done]
    for resp in results[:8]:
        choice = resp.choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    alone = free(0).choices[0].message.content  # a free request is untouched by its neighbours' masks
    assert results[8].choices[0].message.content == alone
    assert idle(stack["worker"])


def test_streamed_json_equals_the_non_streamed_and_json_object_mode(client):
    kwargs = dict(
        model=MODEL, messages=ASK, temperature=0.7, seed=3, max_tokens=80, response_format=person_format()
    )
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    parts = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**kwargs, stream=True)
        if c.choices
    ]
    assert "".join(parts) == whole
    jsonschema.validate(json.loads(whole), PERSON)
    resp = client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=0, max_tokens=120, response_format={"type": "json_object"}
    )
    if resp.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(resp.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a prefix of one object
        assert resp.choices[0].message.content.startswith("{")


def test_a_named_tool_call_parses_into_tool_calls(client):
    for stream in (False, True):
        kwargs = dict(model=MODEL, messages=WEATHER_ASK, tools=[WEATHER, TIME], max_tokens=60, temperature=0,
                      tool_choice={"type": "function", "function": {"name": "get_weather"}})  # fmt: skip
        if not stream:
            choice = client.chat.completions.create(**kwargs).choices[0]
            calls, finish = choice.message.tool_calls, choice.finish_reason
            assert choice.message.content is None
        else:
            deltas = [
                c.choices[0] for c in client.chat.completions.create(**kwargs, stream=True) if c.choices
            ]
            calls = [t for d in deltas for t in (d.delta.tool_calls or [])]
            finish = deltas[-1].finish_reason
        assert finish == "tool_calls" and len(calls) == 1
        assert calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
        jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])


def test_required_tool_calls_pick_among_the_tools(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=WEATHER_ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=120,
        temperature=0.8, seed=1, n=3, parallel_tool_calls=False,
    )  # fmt: skip
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for choice in resp.choices:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_guided_extras_and_completions(client):
    resp = client.completions.create(model=MODEL, prompt="The best color is", max_tokens=5, temperature=1.0,
                                     seed=4, extra_body={"guided_choice": ["red", "green", "blue"]})  # fmt: skip
    assert resp.choices[0].text in ("red", "green", "blue")
    resp = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=0,
                                          extra_body={"guided_regex": "[0-9]{3}-[0-9]{4}"})  # fmt: skip
    assert resp.choices[0].message.content.count("-") == 1 and len(resp.choices[0].message.content) == 8


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"response_format": person_format(), "tool_choice": "required", "tools": [WEATHER]}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
            "response_format",
        ),
        ({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex"),
        ({"extra_body": {"guided_json": "{not json"}}, "guided_json"),
    ],
)
def test_what_cannot_be_honoured_is_a_400(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, **kwargs)
    assert e.value.body["param"] == param


def test_auto_tool_calls_are_parsed_from_hermes_blocks():
    s = Structure(calls="auto")
    content, calls = s.parse(
        'Let me check.<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
    )
    assert content == "Let me check." and calls[0]["function"] == {
        "name": "get_time",
        "arguments": '{"tz": "UTC"}',
    }
    assert s.parse("no call here") == ("no call here", [])
    assert s.parse("<tool_call>{broken</tool_call>")[1] == []  # malformed: content, as vLLM's parser does
    assert s.holds_back("  <tool_") and not s.holds_back("Hello")


@pytest.fixture(scope="module")
def engine(default_model_dir):
    return LLMEngine.from_store(default_model_dir, EngineConfig())


def grammar(schema) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)


def test_engine_masks_only_the_rows_with_a_grammar(engine):
    prompt = engine.tokenizer.encode_chat(ASK)
    free = SamplingParams(max_tokens=24, temperature=0)
    alone = engine.generate([prompt], free)[0]
    outs = engine.generate([prompt] * 3, [SamplingParams(max_tokens=80, temperature=0, grammar=grammar(PERSON)),
                                          free, SamplingParams(max_tokens=80, seed=7, grammar=grammar(PERSON))])  # fmt: skip
    for out in (outs[0], outs[2]):
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), PERSON)
    assert outs[1].output_token_ids == alone.output_token_ids
    with pytest.raises(ValueError, match="grammar"):
        engine.add_request("bad", prompt, SamplingParams(grammar="start: ("))


def test_a_handoff_continues_inside_the_grammar(engine):
    prompt = engine.tokenizer.encode_chat(ASK)
    params = SamplingParams(max_tokens=80, temperature=0.9, seed=11, grammar=grammar(PERSON))
    whole = engine.generate([prompt], params)[0]
    engine.add_request("pf", prompt, params, prefill_only=True)
    handoff = None
    while handoff is None:
        for out in engine.step():
            handoff = out.kv_handoff or handoff
    engine.add_request("dec", prompt, params, kv_handoff=handoff)
    final = None
    while final is None:
        for out in engine.step():
            if out.finished:
                final = out
    assert final.output_token_ids == whole.output_token_ids
    jsonschema.validate(json.loads(final.text), PERSON)
