"""OpenAI request bodies (pydantic) and their translation to the platform's SamplingParams, plus the
OpenAI error shape. Unknown fields are ignored, as OpenAI-compatible servers do."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.core.sampling_params import SamplingParams


class OpenAIError(Exception):
    """An error the gateway answers in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.headers = headers  # e.g. Retry-After on a 429
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or {
            400: "invalid_request_error",
            401: "authentication_error",
            403: "permission_error",
            404: "invalid_request_error",
            413: "invalid_request_error",
            409: "invalid_request_error",
            429: "rate_limit_exceeded",
        }.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (beyond these: 400, or 413 for the body), and what it is told."""

    max_body_bytes: int = 16 * 2**20  # a JSON request body
    max_upload_bytes: int = 512 * 2**20  # POST /v1/files
    max_choices: int = 64  # prompts x n in one request
    max_stop: int = 16  # stop strings, each at most max_stop_chars
    max_stop_chars: int = 1024
    max_stop_token_ids: int = 64
    max_logit_bias: int = 300  # entries (OpenAI's limit)
    allow_priority: bool = False  # let clients set `priority` (it can preempt other requests)
    route_header: bool = False  # answer with `x-tandem-route` (worker addresses, prefix hits): debugging
    request_timeout_s: float = 600.0  # a whole generation; beyond it: 504 (or an error event when streaming)


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str = "function"
    function: FunctionSpec


class _Sampling(BaseModel):
    """Fields shared by chat and completions requests."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    user: str | None = None
    # the extras vLLM users expect
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0
    cache_salt: str | None = None
    # structured output (services/gateway/structured.py)
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    # speculative decoding (the worker's default when unset): off | ngram | draft, and drafts per step
    speculative: str | None = None
    speculative_tokens: int | None = None

    def check_limits(self, limits: Limits) -> None:
        """The size caps and what only an operator may allow (400 naming the field)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > limits.max_stop or any(len(s) > limits.max_stop_chars for s in stop):
            raise OpenAIError(
                400,
                f"stop: at most {limits.max_stop} strings of at most {limits.max_stop_chars} characters",
                "stop",
            )
        if len(self.stop_token_ids or ()) > limits.max_stop_token_ids:
            raise OpenAIError(
                400, f"stop_token_ids: at most {limits.max_stop_token_ids} ids", "stop_token_ids"
            )
        if len(self.logit_bias or {}) > limits.max_logit_bias:
            raise OpenAIError(400, f"logit_bias: at most {limits.max_logit_bias} entries", "logit_bias")
        if self.priority and not limits.allow_priority:
            raise OpenAIError(
                400, "priority is not enabled on this gateway (its operator can allow it)", "priority"
            )

    def sampling_params(
        self, max_tokens: int, logprobs: int | None, choice: int, grammar: str | None = None
    ) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            bias = tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items())
        except ValueError as e:
            raise OpenAIError(400, "logit_bias keys must be token ids", "logit_bias") from e
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            logit_bias=bias,
            min_tokens=self.min_tokens,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            # n > 1 with a seed: choice i uses seed + i, so the n choices differ and reproduce
            seed=None if self.seed is None else self.seed + choice,
            logprobs=logprobs,
            stop=tuple(stop),
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            priority=self.priority,
            cache_salt=self.cache_salt,
            grammar=grammar,
            speculative=self.speculative,
            speculative_tokens=self.speculative_tokens,
        )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer to one of them

    def text(self) -> str:
        """The message as the chat template sees it: an assistant's tool calls in the Hermes format
        the tool prompt teaches (structured.py)."""
        calls = "".join(
            "<tool_call>\n" + json.dumps({"name": (c.get("function") or {}).get("name"),
                                         "arguments": _arguments(c)}) + "\n</tool_call>"
            for c in self.tool_calls or ()
        )  # fmt: skip
        return self._content() + calls

    def _content(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise OpenAIError(400, f"content part type '{part.get('type')}' is not supported", "messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


def _arguments(call: dict):
    args = (call.get("function") or {}).get("arguments", "{}")
    try:
        return json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        return args


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def requested_max_tokens(self) -> int | None:
        return 16 if self.max_tokens is None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        return self.logprobs


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, lt=2**31)]] = Field(max_length=1 << 20)
