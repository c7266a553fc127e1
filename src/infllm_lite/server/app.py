"""The HTTP application: OpenAI's ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions``, the conversation endpoints, ``/health`` and ``/metrics``, on
one :class:`~infllm_lite.engine.Engine` stepped by one thread.

    app = create_app(model, tokenizer, ServerSettings(model_name="SmolLM2-135M-Instruct"))
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..cli_support import OPTION_MODES
from ..engine import DEFAULT_STEP_TOKENS, Engine, Request, SamplingOptions
from ..errors import InfLLMLiteError
from ..memory_config import MemoryConfig
from ..prompts import encode_prompt
from .auth import ApiKeys
from .completions import ClientGone, Job, run_job
from .conversations import ConversationStore
from .metrics import ServerMetrics
from .runner import EngineRunner
from .schemas import (FULL_MEMORY, APIError, ChatRequest, CompletionRequest, ConversationCreate, Extensions,
                      bad_request, parse)
from .settings import ServerSettings

log = logging.getLogger("infllm_lite.server")
ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/conversations")


class CountRequests:
    """ASGI middleware: every answered request counted by endpoint and status (a pure ASGI
    wrapper, so streams and disconnects pass through untouched)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = {}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_counted)
        finally:
            path = scope.get("path", "")
            endpoint = next((e for e in ENDPOINTS if path == e or path.startswith(e + "/")), "other")
            self.metrics.requests.labels(endpoint=endpoint, status=str(seen.get("status", 499))).inc()


def build_engine(model, tokenizer, settings: ServerSettings, *, store_class=ConversationStore, metrics=None):
    """The server's engine and conversation store (every rank of a tensor-parallel server
    builds the same pair)."""
    engine = Engine(model, tokenizer, memory_budget=settings.memory_budget, max_sequences=settings.max_sequences,
                    step_tokens=settings.step_tokens or DEFAULT_STEP_TOKENS,
                    attention_kernel=settings.attention_kernel)
    store = store_class(model, tokenizer, engine, snapshot_dir=settings.snapshot_dir,
                        capacity=model.args.max_position_embeddings, kernel=settings.attention_kernel,
                        max_conversations=settings.max_conversations, metrics=metrics)
    engine.make_room = store.make_room
    return engine, store


def create_app(model, tokenizer, settings: ServerSettings, *, store_class=ConversationStore,
               runner_class=EngineRunner) -> FastAPI:
    """``store_class`` and ``runner_class``: the tensor-parallel server's rank 0 passes its
    own (:mod:`infllm_lite.parallel.serve`)."""
    metrics = ServerMetrics()
    engine, store = build_engine(model, tokenizer, settings, store_class=store_class, metrics=metrics)
    capacity = model.args.max_position_embeddings  # a full-attention conversation's cache
    runner = runner_class(engine, max_queue=settings.max_queue, metrics=metrics)
    keys = ApiKeys(settings.api_keys)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        runner.start()
        yield
        await run_in_threadpool(runner.stop)
        await run_in_threadpool(store.close)

    app = FastAPI(title="infllm-lite", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.store, app.state.runner, app.state.metrics = engine, store, runner, metrics
    app.add_middleware(CountRequests, metrics=metrics)

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        message = {404: "no such endpoint", 405: "method not allowed here"}.get(e.status_code, str(e.detail))
        return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        return JSONResponse(bad_request(str(e.errors()[0].get("msg", e))).body(), status_code=400)

    @app.exception_handler(ClientGone)
    async def client_gone(_, e):
        return Response(status_code=499)  # nobody reads it

    @app.exception_handler(Exception)
    async def unexpected(_, e: Exception):
        log.exception("unexpected error")
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", type="server_error").body(),
                            status_code=500)

    # ------------------------------------------------------------------ helpers
    async def owner(request: HTTPRequest) -> str:
        return keys.owner(request.headers.get("authorization"))

    async def body_of(request: HTTPRequest) -> bytes:
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                               code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{settings.model_name}'",
                           param="model", code="model_not_found")

    def memory_of(ext: Extensions) -> tuple[str, MemoryConfig | None]:
        attention = ext.attention or settings.attention
        given = ext.memory.given() if ext.memory is not None else {}
        fields = {**settings.memory, **given}
        if attention == "full":  # a KV cache: only how it is stored (kv_dtype) applies
            refused = sorted(k for k in given if attention not in OPTION_MODES.get(k, ()))
            if refused:
                raise bad_request(FULL_MEMORY.format(", ".join(refused)), param="memory")
            fields = {k: v for k, v in fields.items() if attention in OPTION_MODES.get(k, ())}
            if not fields:
                return attention, None
        try:
            return attention, MemoryConfig.for_model(model.args, **fields)
        except InfLLMLiteError as e:
            raise bad_request(str(e), param="memory") from None

    def check_length(ids: list[int], param: str) -> None:
        if len(ids) > settings.max_prompt_tokens:
            raise bad_request(f"the prompt has {len(ids)} tokens; this server takes at most "
                              f"{settings.max_prompt_tokens} (--max-prompt-tokens)", param=param,
                              code="context_length_exceeded")

    def sampling(body, j: int) -> SamplingOptions:
        return SamplingOptions(temperature=1.0 if body.temperature is None else body.temperature,
                               top_p=1.0 if body.top_p is None else body.top_p,
                               seed=None if body.seed is None else body.seed + j)

    def requests_for(prompts: list[list[int]], body, kind: str, **fields) -> list[Request]:
        max_tokens = body.max_tokens or settings.default_max_tokens[kind]
        return [Request(ids, max_new_tokens=max_tokens, sampling=sampling(body, j), stop=body.stops(), **fields)
                for ids in prompts for j in range(body.n)]

    async def run(job: Job, http: HTTPRequest) -> Response:
        try:
            return await run_job(job, runner, http)
        except InfLLMLiteError as e:  # the engine refused a request at submission
            raise bad_request(str(e)) from None

    # ------------------------------------------------------------------ endpoints
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "waiting": len(engine.waiting),
                "running": len(engine.running)}

    @app.get("/metrics")
    async def metrics_text(_: str = Depends(owner)):
        metrics.engine_state(engine, [s.state for s in list(engine.running)] + store.memories())
        return Response(metrics.render(), media_type=metrics.content_type)

    def model_card() -> dict:
        return {"id": settings.model_name, "object": "model", "created": started, "owned_by": "infllm-lite"}

    @app.get("/v1/models")
    async def models(_: str = Depends(owner)):
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str, _: str = Depends(owner)):
        check_model(name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest, who: str = Depends(owner)):
        body = parse(CompletionRequest, await body_of(http))
        check_model(body.model)
        raw = body.prompt
        prompts = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
        if not prompts:
            raise bad_request("the prompt is empty", param="prompt")
        try:
            ids = [encode_prompt(tokenizer, p) for p in prompts]
        except InfLLMLiteError as e:
            raise bad_request(str(e), param="prompt") from None
        for p in ids:
            check_length(p, "prompt")
        attention, memory = memory_of(body)
        job = Job(requests_for(ids, body, "completion", attention=attention, memory=memory),
                  prompt_tokens=sum(map(len, ids)), model=settings.model_name, chat=False, stream=body.stream,
                  include_usage=bool(body.stream_options and body.stream_options.include_usage))
        return await run(job, http)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest, who: str = Depends(owner)):
        body = parse(ChatRequest, await body_of(http))
        check_model(body.model)
        messages = [m.as_template() for m in body.messages]
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.conversation_id is None:
            try:
                ids = encode_prompt(tokenizer, messages)
            except InfLLMLiteError as e:
                raise bad_request(str(e), param="messages") from None
            check_length(ids, "messages")
            attention, memory = memory_of(body)
            job = Job(requests_for([ids], body, "chat", attention=attention, memory=memory), prompt_tokens=len(ids),
                      model=settings.model_name, chat=True, stream=body.stream, include_usage=include_usage)
            return await run(job, http)
        if body.n != 1:
            raise bad_request("a conversation answers with one choice (n=1)", param="n")
        for name in ("attention", "memory"):
            if getattr(body, name) is not None:
                raise bad_request(f"{name} is the conversation's, set when it was created", param=name)
        turn = await run_in_threadpool(store.begin_turn, body.conversation_id, who, messages)
        conv = turn.conversation
        fields = dict(attention=conv.attention, memory=conv.memory, state=turn.state, position=turn.position,
                      capacity=capacity if conv.attention == "full" else None, keep_state=True)
        job = Job(requests_for([turn.new_ids], body, "chat", **fields), prompt_tokens=len(turn.new_ids),
                  model=settings.model_name, chat=True, stream=body.stream, include_usage=include_usage,
                  extra={"conversation_id": conv.id}, on_finish=lambda seq: store.end_turn(turn, seq),
                  turn=turn)
        try:
            check_length(turn.new_ids, "messages")
            return await run(job, http)
        finally:
            if not job.submitted:  # refused before the engine had it (a submitted turn ends in end_turn)
                store.abort_turn(turn)

    @app.post("/v1/conversations")
    async def create_conversation(http: HTTPRequest, who: str = Depends(owner)):
        raw = await body_of(http)
        body = parse(ConversationCreate, raw if raw.strip() else b"{}")
        check_model(body.model)
        attention, memory = memory_of(body)
        conv = await run_in_threadpool(store.create, who, attention, memory, body.system)
        return conv.info()

    @app.get("/v1/conversations")
    async def list_conversations(who: str = Depends(owner)):
        return {"object": "list", "data": [c.info() for c in store.list(who)]}

    @app.get("/v1/conversations/{conv_id}")
    async def get_conversation(conv_id: str, who: str = Depends(owner)):
        conv = store.get(conv_id, who)
        return {**conv.info(), "history": conv.messages}

    @app.delete("/v1/conversations/{conv_id}")
    async def delete_conversation(conv_id: str, who: str = Depends(owner)):
        await run_in_threadpool(store.delete, conv_id, who)
        return {"id": conv_id, "object": "conversation.deleted", "deleted": True}

    return app
