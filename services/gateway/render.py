"""How the gateway renders results in OpenAI's shapes: usage, logprobs, and the SSE chunk streams of
chat and text completions (each ends with `data: [DONE]`; an error mid-stream is an error event)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from services.gateway.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from shared.rpc.convert import FINISH_REASON_NAMES
from tandem.v1 import common_pb2

if TYPE_CHECKING:
    from services.gateway.gateway import Gateway
    from services.gateway.structured import Structure


def stop_reason(chunk: common_pb2.TokenChunk):
    which = chunk.WhichOneof("stop_reason")
    return getattr(chunk, which) if which else None


def usage_json(per_prompt: list[common_pb2.Usage], completion_tokens: int) -> dict:
    prompt = sum(u.prompt_tokens for u in per_prompt)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(u.cached_tokens for u in per_prompt)},
    }


def chat_logprobs_json(logprobs, strings: dict[int, str]) -> dict:
    def entry(token_id, lp):
        s = strings.get(token_id, "")
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t.token_id, t.logprob) for t in lp.top]}
            for lp in logprobs
        ]
    }


def completion_logprobs_json(logprobs, strings: dict[int, str], offset: int) -> dict:
    tokens, offsets = [], []
    for lp in logprobs:
        offsets.append(offset)
        tokens.append(strings.get(lp.token_id, ""))
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{strings.get(t.token_id, ""): t.logprob for t in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_chat(
    gw: Gateway, body: ChatCompletionRequest, chunks, base: dict, include_usage: bool, structure: Structure
):
    chunk_base = {**base, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}
    usage, completion_tokens = None, 0
    held: dict[int, str] = {}  # text of choices that are (or may become) tool calls, sent at their end
    flowing: set[int] = set()  # choices whose text streams as it comes
    try:
        for i in range(body.n):
            yield sse(
                {
                    **chunk_base,
                    "choices": [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                    **extra,
                }
            )
        async for index, chunk in chunks:
            completion_tokens += len(chunk.token_ids)
            finish = FINISH_REASON_NAMES[chunk.finish_reason]
            logprobs = None
            if body.logprobs and chunk.logprobs:
                logprobs = chat_logprobs_json(
                    chunk.logprobs, await gw.token_strings(body.model, chunk.logprobs)
                )
            text = chunk.text
            delta = {"content": text} if text or logprobs else {}
            if index not in flowing:
                sofar = held.get(index, "") + text
                if structure.holds_back(sofar) and not finish:
                    held[index] = sofar
                    continue
                if finish:
                    content, calls = structure.parse(sofar) if structure.calls != "none" else (sofar, [])
                    delta = {"content": content} if content else {}
                    if calls:
                        delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(calls)]
                        finish = "tool_calls" if finish == "stop" else finish
                else:
                    flowing.add(index)
                    delta = {"content": sofar}
                held.pop(index, None)
            if delta or logprobs or finish:
                choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
                if finish:
                    choice["stop_reason"] = stop_reason(chunk)
                yield sse({**chunk_base, "choices": [choice], **extra})
            if finish and index == 0:
                usage = chunk.usage
        if include_usage:
            yield sse({**chunk_base, "choices": [], "usage": usage_json([usage], completion_tokens)})
    except OpenAIError as e:
        yield sse(e.body())
    yield "data: [DONE]\n\n"


async def stream_completion(
    gw: Gateway, body: CompletionRequest, chunks, base: dict, include_usage: bool, num_prompts: int
):
    chunk_base = {**base, "object": "text_completion"}
    extra = {"usage": None} if include_usage else {}
    usages, completion_tokens, offsets = {}, 0, {}
    try:
        async for index, chunk in chunks:
            completion_tokens += len(chunk.token_ids)
            finish = FINISH_REASON_NAMES[chunk.finish_reason]
            logprobs = None
            if body.logprobs is not None and chunk.logprobs:
                strings = await gw.token_strings(body.model, chunk.logprobs)
                logprobs = completion_logprobs_json(chunk.logprobs, strings, offsets.get(index, 0))
            offsets[index] = offsets.get(index, 0) + len(chunk.text)
            if chunk.text or logprobs or finish:
                choice = {"index": index, "text": chunk.text, "logprobs": logprobs, "finish_reason": finish}
                if finish:
                    choice["stop_reason"] = stop_reason(chunk)
                yield sse({**chunk_base, "choices": [choice], **extra})
            if finish and index % body.n == 0:
                usages[index // body.n] = chunk.usage
        if include_usage:
            per_prompt = [usages[i] for i in range(num_prompts) if i in usages]
            yield sse({**chunk_base, "choices": [], "usage": usage_json(per_prompt, completion_tokens)})
    except OpenAIError as e:
        yield sse(e.body())
    yield "data: [DONE]\n\n"


def chat_response(
    base: dict, body: ChatCompletionRequest, choices, strings: dict[int, str], structure: Structure
) -> dict:
    """A whole chat completion (choices: the gateway's collected Choice list); tool calls parsed out
    of each choice's text as the request's tools ask."""

    def choice(c) -> dict:
        content, calls = structure.parse(c.text) if structure.calls != "none" else (c.text, [])
        message = {"role": "assistant", "content": content}
        finish = c.finish_reason
        if calls:
            message["tool_calls"] = calls
            finish = "tool_calls" if finish == "stop" else finish
        return {
            "index": c.index,
            "message": message,
            "logprobs": chat_logprobs_json(c.logprobs, strings) if body.logprobs else None,
            "finish_reason": finish,
            "stop_reason": c.stop_reason,
        }

    return {
        **base,
        "object": "chat.completion",
        "choices": [choice(c) for c in choices],
        "usage": usage_json([choices[0].usage], sum(len(c.token_ids) for c in choices)),
    }


def completion_response(
    base: dict, body: CompletionRequest, choices, strings: dict[int, str], num_prompts: int
) -> dict:
    """A whole text completion of `num_prompts` prompts, `body.n` choices each."""
    return {
        **base,
        "object": "text_completion",
        "choices": [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": completion_logprobs_json(c.logprobs, strings, 0)
                if body.logprobs is not None
                else None,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            for c in choices
        ],
        "usage": usage_json(
            [choices[pi * body.n].usage for pi in range(num_prompts)], sum(len(c.token_ids) for c in choices)
        ),
    }
