"""The gateway's gRPC clients: the tokenizer and the router, with a deadline on every call."""

from __future__ import annotations

from shared.rpc.interceptors import REQUEST_ID_KEY
from shared.rpc.security import channel
from shared.telemetry.logs import request_id_var
from tandem.v1 import common_pb2, router_pb2, router_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc


def _metadata() -> tuple | None:
    """The current request's id for the services' logs (x-request-id), when there is one."""
    request_id = request_id_var.get()
    return ((REQUEST_ID_KEY, request_id),) if request_id else None


class Backends:
    def __init__(
        self,
        tokenizer_address: str,
        router_address: str,
        call_timeout: float = 10.0,
        request_timeout: float = 600.0,
    ):
        self.tokenizer_channel = channel(tokenizer_address)
        self.router_channel = channel(router_address)
        self.tokenizer = tokenizer_pb2_grpc.TokenizerStub(self.tokenizer_channel)
        self.router = router_pb2_grpc.RouterStub(self.router_channel)
        self.call_timeout = call_timeout  # unary calls (tokenize, info, abort)
        self.request_timeout = request_timeout  # a whole generation stream

    async def close(self) -> None:
        await self.tokenizer_channel.close()
        await self.router_channel.close()

    async def info(self, model: str) -> tokenizer_pb2.TokenizerInfo:
        return await self.tokenizer.Info(
            tokenizer_pb2.TokenizerInfoRequest(model=model), timeout=self.call_timeout, metadata=_metadata()
        )

    async def list_models(self) -> tokenizer_pb2.ListModelsResponse:
        return await self.tokenizer.ListModels(
            tokenizer_pb2.ListModelsRequest(), timeout=self.call_timeout, metadata=_metadata()
        )

    async def tokenize_text(self, model: str, text: str, add_special_tokens: bool = True) -> list[int]:
        req = tokenizer_pb2.TokenizeRequest(model=model, text=text, add_special_tokens=add_special_tokens)
        return list(
            (await self.tokenizer.Tokenize(req, timeout=self.call_timeout, metadata=_metadata())).token_ids
        )

    async def tokenize_chat(
        self, model: str, messages: list[dict], add_generation_prompt: bool = True, tools_json: str = ""
    ):
        chat = tokenizer_pb2.ChatMessages(
            messages=[
                tokenizer_pb2.ChatMessage(role=m["role"], content=m["content"], name=m.get("name") or "")
                for m in messages
            ],
            tools_json=tools_json,
        )
        req = tokenizer_pb2.TokenizeRequest(
            model=model, chat=chat, add_generation_prompt=add_generation_prompt
        )
        resp = await self.tokenizer.Tokenize(req, timeout=self.call_timeout, metadata=_metadata())
        return list(resp.token_ids), resp.prompt

    async def detokenize(self, model: str, ids: list[int], skip_special_tokens: bool = True) -> str:
        req = tokenizer_pb2.DetokenizeRequest(
            model=model, token_ids=ids, skip_special_tokens=skip_special_tokens
        )
        return (await self.tokenizer.Detokenize(req, timeout=self.call_timeout, metadata=_metadata())).text

    async def token_strings(self, model: str, ids: list[int]) -> list[str]:
        """Each id decoded alone (for logprobs), special tokens included."""
        req = tokenizer_pb2.DetokenizeBatchRequest(
            requests=[
                tokenizer_pb2.DetokenizeRequest(model=model, token_ids=[t], skip_special_tokens=False)
                for t in ids
            ]
        )
        resp = await self.tokenizer.DetokenizeBatch(req, timeout=self.call_timeout, metadata=_metadata())
        return [r.text for r in resp.responses]

    def generate(self, request: common_pb2.GenerateRequest):
        return self.router.Generate(request, timeout=self.request_timeout, metadata=_metadata())

    async def abort(self, request_id: str) -> None:
        await self.router.Abort(
            common_pb2.AbortRequest(request_id=request_id), timeout=self.call_timeout, metadata=_metadata()
        )

    async def workers(self) -> router_pb2.ListWorkersResponse:
        return await self.router.ListWorkers(
            router_pb2.ListWorkersRequest(), timeout=self.call_timeout, metadata=_metadata()
        )
