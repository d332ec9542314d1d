"""The tokenizer service: text <-> token ids with each served model's own tokenizer and chat template.

    tandem serve tokenizer --model smollm2-135m-instruct [--model other] [--port P]

An empty `model` field in a request means the only (or first) model served. A LoRA fine-tune in the
store whose base is served (`ft:...` names included) is served too, with its own tokenizer files,
from the first request that names it: a model trained after start-up needs no restart. Errors are gRPC status
codes: an unknown model NOT_FOUND, a bad chat (template error, no template) or a token id outside the
vocabulary INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc

from shared.core.sampling_params import SamplingParams
from shared.store import ModelStore, StoreError
from shared.tokenizer import ChatTemplateError, Tokenizer
from shared.tokenizer.detokenizer import IncrementalDetokenizer
from tandem.v1 import tokenizer_pb2 as pb
from tandem.v1 import tokenizer_pb2_grpc

SERVICE_NAME = "tandem.v1.Tokenizer"


#: inputs at least this long (characters) are tokenized on a thread: a 16 MiB prompt must not stall
#: every other caller of the service's event loop
OFF_LOOP_CHARS = 16_384


async def off_loop(size: int, fn, *args, **kwargs):
    """fn(*args, **kwargs) here for small inputs, on a worker thread for large ones."""
    if size < OFF_LOOP_CHARS:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


async def encode(tok: Tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of `text`; a large one on a thread through `encode_batch`: the `tokenizers` binding
    holds the GIL for a whole `encode` call (measured: an 8 s stall of every other caller for a
    9 MB prompt) but lets it go inside `encode_batch`."""
    if len(text) < OFF_LOOP_CHARS:
        return tok.encode(text, add_special_tokens=add_special_tokens)
    return (await asyncio.to_thread(tok.encode_batch, [text], add_special_tokens))[0]


class ServedTokenizer:
    def __init__(self, name: str, path: Path, config_dir: Path | None = None):
        self.name = name
        self.tokenizer = Tokenizer.from_dir(path)
        config = json.loads(((config_dir or path) / "config.json").read_text())
        self.max_model_len = int(config.get("max_position_embeddings") or 0)


class TokenizerService(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, store: ModelStore, models: list[str]):
        if not models:
            raise ValueError("the tokenizer service needs at least one --model")
        self.store = store
        self.models = {name: ServedTokenizer(name, store.path(store.get(name).name)) for name in models}
        self.bases = list(models)
        self.default = models[0]

    def _adapter(self, name: str) -> ServedTokenizer | None:
        """A LoRA fine-tune of a served base, from the store (None if there is no such model)."""
        try:
            info = self.store.get(name)
        except (StoreError, OSError):
            return None
        if info.base_model not in self.bases:
            return None
        served = ServedTokenizer(name, self.store.path(name), self.store.path(info.base_model))
        self.models[name] = served
        return served

    async def _model(self, name: str, context) -> ServedTokenizer:
        served = self.models.get(name or self.default)
        if served is not None and served.name not in self.bases and not self.store.has(served.name):
            del self.models[served.name]  # a fine-tune removed from the store since
            served = None
        served = served or self._adapter(name)
        if served is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"model '{name}' is not served here (models: {sorted(self.models)})",
            )
        return served

    async def _tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        served = await self._model(request.model, context)
        tok = served.tokenizer
        kind = request.WhichOneof("input")
        if kind == "chat":
            messages = [
                {"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
                for m in request.chat.messages
            ]
            add_gen = request.add_generation_prompt if request.HasField("add_generation_prompt") else True
            size = sum(len(m["content"]) for m in messages) + len(request.chat.tools_json)
            try:
                tools = json.loads(request.chat.tools_json) if request.chat.tools_json else None
            except json.JSONDecodeError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"tools_json is not valid JSON: {e}")
            try:
                prompt = await off_loop(
                    size, tok.apply_chat_template, messages, add_generation_prompt=add_gen, tools=tools
                )
            except ChatTemplateError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"chat template: {e}")
            ids = await encode(tok, prompt, add_special_tokens=False)
            return pb.TokenizeResponse(token_ids=ids, prompt=prompt)
        if kind == "text":
            special = request.add_special_tokens if request.HasField("add_special_tokens") else True
            ids = await encode(tok, request.text, add_special_tokens=special)
            return pb.TokenizeResponse(token_ids=ids)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give either text or chat messages")

    async def _check_ids(self, served: ServedTokenizer, ids, context) -> None:
        vocab = served.tokenizer.vocab_size
        bad = [t for t in ids if t >= vocab]
        if bad:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"token id {bad[0]} is outside the vocabulary of {vocab}"
            )

    async def Tokenize(self, request, context):
        return await self._tokenize(request, context)

    async def TokenizeBatch(self, request, context):
        return pb.TokenizeBatchResponse(
            responses=[await self._tokenize(r, context) for r in request.requests]
        )

    async def CountTokens(self, request, context):
        return pb.CountTokensResponse(count=len((await self._tokenize(request, context)).token_ids))

    async def _detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        served = await self._model(request.model, context)
        await self._check_ids(served, request.token_ids, context)
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        ids = list(request.token_ids)
        return pb.DetokenizeResponse(text=await off_loop(len(ids) * 4, served.tokenizer.decode, ids, skip))

    async def Detokenize(self, request, context):
        return await self._detokenize(request, context)

    async def DetokenizeBatch(self, request, context):
        return pb.DetokenizeBatchResponse(
            responses=[await self._detokenize(r, context) for r in request.requests]
        )

    async def DetokenizeStream(self, request_iterator, context):
        detok = served = None
        async for request in request_iterator:
            if detok is None:
                served = await self._model(request.model, context)
                skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
                params = SamplingParams(skip_special_tokens=skip)
                detok = IncrementalDetokenizer(served.tokenizer, list(request.prompt_token_ids), params)
            await self._check_ids(served, request.token_ids, context)
            detok.update(list(request.token_ids))
            yield pb.DetokenizeStreamResponse(text=detok.next_text(finished=False))

    async def ListModels(self, request, context):
        entries = [pb.ModelEntry(name=name) for name in self.bases]
        for info in self.store.list():
            if info.base_model in self.bases:
                created = int(self.store.path(info.name).stat().st_mtime)
                entries.append(pb.ModelEntry(name=info.name, base_model=info.base_model, created_at=created))
        return pb.ListModelsResponse(models=entries)

    async def Info(self, request, context):
        served = await self._model(request.model, context)
        tok = served.tokenizer
        info = pb.TokenizerInfo(
            model=served.name,
            vocab_size=tok.vocab_size,
            stop_token_ids=list(tok.stop_token_ids),
            has_chat_template=bool(tok.chat_template),
            max_model_len=served.max_model_len,
        )
        if tok.bos_token_id is not None:
            info.bos_token_id = tok.bos_token_id
        if tok.eos_token_id is not None:
            info.eos_token_id = tok.eos_token_id
        return info


def register(server, store: ModelStore, models: list[str]) -> TokenizerService:
    service = TokenizerService(store, models)
    server.add(tokenizer_pb2_grpc.add_TokenizerServicer_to_server, service, SERVICE_NAME)
    return service


async def start_server(
    store: ModelStore, models: list[str], host: str = "127.0.0.1", port: int = 0, metrics_port: int | None = 0
):
    """A started tokenizer server (GrpcServer; .port is the bound port)."""
    from shared.rpc.server import GrpcServer

    server = GrpcServer("tokenizer", host, port, metrics_port=metrics_port)
    register(server, store, models)
    await server.start()
    return server
