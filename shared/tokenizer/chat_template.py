"""Chat templates: the Jinja2 templates models ship in tokenizer_config.json, rendered the way
Hugging Face renders them (sandboxed, trim_blocks + lstrip_blocks, `raise_exception`,
`strftime_now`, a `tojson` that keeps non-ASCII text), so a prompt is byte-identical to what the
model saw in training."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template rejected the conversation (e.g. roles out of order) or failed to render."""


def _raise(message: str):
    raise ChatTemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse: {e}") from e


def render_chat(source: str, messages: list[dict], add_generation_prompt: bool, **variables) -> str:
    try:
        return _compile(source).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from e


def with_tools(source: str, messages: list[dict], tools: list[dict] | None) -> tuple[list[dict], dict]:
    """The conversation and template variables for a request offering `tools` (OpenAI's list): a
    template that reads `tools` gets them as they are; for one that does not, a system prompt
    describes them and asks for calls as `<tool_call>{"name": …, "arguments": {…}}</tool_call>`
    (the format the gateway parses), joined to the conversation's own system message."""
    if not tools:
        return messages, {}
    if "tools" in source:
        return messages, {"tools": tools}
    prompt = (
        "You can call these functions (their JSON signatures, one per line, inside <tools></tools>):\n"
        "<tools>\n" + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) + "\n</tools>\n"
        "To call one, answer with a JSON object naming the function and its arguments inside "
        "<tool_call></tool_call> tags, one block per call:\n"
        '<tool_call>\n{"name": "<function name>", "arguments": {<arguments as JSON>}}\n</tool_call>'
    )
    if messages and messages[0]["role"] in ("system", "developer"):
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{prompt}"}
        return [first, *messages[1:]], {}
    return [{"role": "system", "content": prompt}, *messages], {}
