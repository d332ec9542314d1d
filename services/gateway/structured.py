"""Structured output and tool calling: what a request's `response_format`, `tools` / `tool_choice`
and vLLM's `guided_*` extras ask of the output, as an llguidance grammar the workers' samplers
enforce (shared/engine/structured.py), and how a finished choice's text becomes `tool_calls`.

  response_format {"type": "json_object"}          any JSON object
  response_format {"type": "json_schema", ...}     JSON matching the schema
  guided_json / guided_regex / guided_choice       vLLM's extras (a schema, a regex, one of the strings)
  tools + tool_choice {"type": "function", ...}    the named function's arguments (a JSON object)
  tools + tool_choice "required"                   a JSON array of {"name", "arguments"} calls
  tools + tool_choice "auto" (the default)         free text; `<tool_call>{"name", "arguments"}</tool_call>`
                                                   blocks in it become tool calls (the Hermes format
                                                   the tool prompt teaches, as vLLM's hermes parser)
  tools + tool_choice "none"                       free text, no parsing

The tools reach the model through its chat template's `tools` variable, or, for a template without
one, a system prompt in that format (shared/tokenizer/chat_template.py). Two constraints at once
(a response_format with a forced tool call, or two guided_* fields) are a 400.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from dataclasses import dataclass

from services.gateway.protocol import ChatCompletionRequest, OpenAIError, _Sampling

#: compact, deterministic JSON (a free whitespace rule lets small models pad forever)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class Structure:
    grammar: str | None = None  # what the workers enforce
    calls: str = "none"  # none | auto | required | named: how a choice's text becomes tool calls
    named: str | None = None  # the function tool_choice names
    tools_json: str = ""  # the tools as the chat template receives them

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, tool_calls) of a finished choice's text."""
        if self.calls == "named":
            return None, [_call(self.named, text)]
        if self.calls == "required":
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                return text, []  # cut short (max_tokens): what there is, as content
            return None, [_call(c["name"], json.dumps(c.get("arguments", {}))) for c in items]
        if self.calls == "auto":
            calls = []
            for m in TOOL_CALL.finditer(text):
                try:
                    obj = json.loads(m.group(1))
                    calls.append(_call(str(obj["name"]), json.dumps(obj.get("arguments", {}))))
                except (json.JSONDecodeError, KeyError, TypeError):
                    return text, []  # not a well-formed call: plain content, as vLLM's parser does
            if calls:
                content = text[: text.index("<tool_call>")].strip()
                return content or None, calls
        return text, []

    def holds_back(self, text: str) -> bool:
        """Streaming: keep this choice's text until it finishes (it is, or may become, tool calls)."""
        if self.calls in ("named", "required"):
            return True
        if self.calls == "auto":
            head = text.lstrip()
            return head.startswith("<tool_call>") or "<tool_call>".startswith(head)
        return False


def _call(name: str, arguments: str) -> dict:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def plan(body: _Sampling) -> Structure:
    """The request's structure, or a 400 naming the field that cannot be honoured."""
    constraints = []
    fmt = getattr(body, "response_format", None)
    if fmt is not None and fmt.type != "text":
        constraints.append(("response_format", _response_format(fmt)))
    if body.guided_json is not None:
        schema = (
            body.guided_json
            if isinstance(body.guided_json, dict)
            else _loads(body.guided_json, "guided_json")
        )
        constraints.append(("guided_json", _json_grammar(schema, "guided_json")))
    if body.guided_regex is not None:
        constraints.append(("guided_regex", _regex_grammar(body.guided_regex)))
    if body.guided_choice is not None:
        if not body.guided_choice:
            raise OpenAIError(400, "guided_choice: give at least one string", "guided_choice")
        constraints.append(
            ("guided_choice", _regex_grammar("|".join(re.escape(c) for c in body.guided_choice)))
        )
    structure = Structure()
    if isinstance(body, ChatCompletionRequest) and body.tools:
        structure = _tools(body)
        if structure.grammar is not None:
            constraints.append(("tool_choice", structure.grammar))
    elif isinstance(body, ChatCompletionRequest) and body.tool_choice not in (None, "none", "auto"):
        raise OpenAIError(400, "tool_choice: give tools to choose from", "tool_choice")
    if len(constraints) > 1:
        names = " and ".join(name for name, _ in constraints)
        raise OpenAIError(
            400, f"{names} cannot be combined: each constrains the whole output", constraints[1][0]
        )
    if constraints:
        structure = dataclasses.replace(structure, grammar=constraints[0][1])
    return structure


def _response_format(fmt) -> str:
    if fmt.type == "json_object":
        return _json_grammar({"type": "object"}, "response_format")
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise OpenAIError(400, "response_format: json_schema needs a schema", "response_format")
    schema = dict(fmt.json_schema.schema_)
    if fmt.json_schema.strict:  # OpenAI's strict mode: no property beyond those listed
        schema.setdefault("additionalProperties", False)
    return _json_grammar(schema, "response_format")


def _tools(body: ChatCompletionRequest) -> Structure:
    functions = []
    for i, tool in enumerate(body.tools):
        if tool.type != "function":
            raise OpenAIError(
                400, f"tools[{i}]: only function tools are supported, got '{tool.type}'", "tools"
            )
        f = tool.function
        functions.append({"name": f.name, "description": f.description or "",
                          "parameters": f.parameters or {"type": "object", "properties": {}}})  # fmt: skip
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise OpenAIError(400, "tools: function names must be unique", "tools")
    tools_json = json.dumps([{"type": "function", "function": f} for f in functions])
    choice = body.tool_choice if body.tool_choice is not None else "auto"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if choice.get("type") != "function" or name not in names:
            raise OpenAIError(
                400, f"tool_choice: names no function among the tools ({', '.join(names)})", "tool_choice"
            )
        params = functions[names.index(name)]["parameters"]
        return Structure(_json_grammar(params, "tools"), "named", name, tools_json)
    if choice == "required":
        one = {"anyOf": [
            {"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
             "required": ["name", "arguments"], "additionalProperties": False}
            for f in functions
        ]}  # fmt: skip
        schema = {
            "type": "array",
            "items": one,
            "minItems": 1,
            **({} if body.parallel_tool_calls else {"maxItems": 1}),
        }
        return Structure(_json_grammar(schema, "tools"), "required", None, tools_json)
    if choice in ("auto", "none"):
        return Structure(None, choice, None, tools_json)
    raise OpenAIError(
        400, f"tool_choice: must be none, auto, required or a function, got {choice!r}", "tool_choice"
    )


def _loads(text: str, param: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise OpenAIError(400, f"{param}: not valid JSON ({e})", param) from e


def _json_grammar(schema, param: str) -> str:
    import llguidance

    if not isinstance(schema, dict):
        raise OpenAIError(400, f"{param}: the schema must be a JSON object", param)
    return _checked(
        param,
        lambda: llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS),
    )


def _regex_grammar(regex: str) -> str:
    import llguidance

    return _checked("guided_regex", lambda: llguidance.LLMatcher.grammar_from_regex(regex))


def _checked(param: str, make) -> str:
    """The grammar `make()` builds, validated; whatever llguidance refuses is the caller's 400."""
    import llguidance

    try:
        grammar = make()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    except Exception as e:  # noqa: BLE001 - the library's errors for a bad schema or regex vary in type
        raise OpenAIError(400, f"{param}: {e}", param) from e
    if is_error:
        raise OpenAIError(400, f"{param}: {'; '.join(messages)}", param)
    return grammar
