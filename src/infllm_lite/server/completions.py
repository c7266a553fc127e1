"""One completion request through the engine thread: its sequences submitted together,
then either collected into one response or streamed as Server-Sent Events. A client that
goes away cancels its sequences (their memories are freed at the engine's next step).

A stream's headers wait for the first event, so a request refused at admission still gets
its own HTTP status; an error after that is an ``error`` event before ``[DONE]``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine import Request
from .runner import EngineRunner
from .schemas import APIError, completion_choice, envelope, new_id, sse, usage

POLL_S = 0.2  # how often a waiting handler checks whether its client is still there


class ClientGone(Exception):
    """The client disconnected before its answer."""


@dataclass
class Job:
    """What one HTTP request asks the engine for: its sequences (choice index = tag) and
    how to answer."""

    requests: list[Request]
    prompt_tokens: int  # for usage: each prompt counted once, whatever n
    model: str
    chat: bool
    stream: bool
    include_usage: bool = False
    extra: dict = field(default_factory=dict)  # fields added to every response object
    on_finish: object = None  # called in the engine thread with each ended sequence
    turn: object = None  # the conversation turn it continues (conversations.Turn), if any
    submitted: bool = False  # the engine has its sequences (they end by themselves from then on)


def _failure(seq) -> APIError | None:
    if seq.finish_reason == "refused":
        return APIError(429, seq.error or "the request cannot be admitted", type="rate_limit_error",
                        code="insufficient_memory")
    if seq.finish_reason == "cancelled":  # ``error``: why (a failed step); without one, a shutdown
        return APIError(503, seq.error or "the request was cancelled (the server is shutting down)",
                        type="server_error", code="cancelled")
    return None


async def _next(queue: asyncio.Queue, http: HTTPRequest):
    """The next item of ``queue``, watching for the client leaving meanwhile."""
    while True:
        try:
            return await asyncio.wait_for(queue.get(), POLL_S)
        except asyncio.TimeoutError:
            if await http.is_disconnected():
                raise ClientGone from None


async def run_job(job: Job, runner: EngineRunner, http: HTTPRequest) -> Response:
    queue: asyncio.Queue = asyncio.Queue()
    ids = runner.submit(job.requests, queue, on_finish=job.on_finish, turn=job.turn)
    job.submitted = True
    n = len(ids)
    response_id = new_id("chatcmpl" if job.chat else "cmpl")
    try:
        first = await _next(queue, http)
    except BaseException:  # the client left (or the handler was cancelled)
        runner.cancel(ids)
        raise
    if len(first) == 3 and (error := _failure(first[2])) is not None:
        runner.cancel(ids)
        raise error
    if job.stream:
        return StreamingResponse(_stream(job, runner, http, queue, ids, first, response_id),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    ended = {}
    item = first
    try:
        while True:
            if len(item) == 3:
                tag, _, seq = item
                if (error := _failure(seq)) is not None:
                    raise error
                ended[tag] = seq
                if len(ended) == n:
                    break
            item = await _next(queue, http)
    except BaseException:
        runner.cancel(ids)
        raise
    seqs = [ended[i] for i in range(n)]
    choices = [completion_choice(i, s.output, s.finish_reason, job.chat) for i, s in enumerate(seqs)]
    body = envelope(response_id, job.model, job.chat, choices,
                    extra={"usage": usage(job.prompt_tokens, sum(len(s.token_ids) for s in seqs)), **job.extra})
    return JSONResponse(body)


async def _stream(job: Job, runner: EngineRunner, http: HTTPRequest, queue: asyncio.Queue, ids: list[int],
                  first, response_id: str):
    n, ended, completion_tokens = len(ids), set(), 0

    def chunk(choices: list[dict], **more) -> str:
        return sse(envelope(response_id, job.model, job.chat, choices, chunk=True, extra={**job.extra, **more}))

    try:
        if job.chat:  # the role first, as OpenAI's streams do
            for i in range(n):
                yield chunk([completion_choice(i, "", None, True, delta=True, first=True)])
        item = first
        while True:
            tag, event = item[0], item[1]
            if len(item) == 3:
                seq = item[2]
                if (error := _failure(seq)) is not None:
                    yield sse(error.body())
                    break
                ended.add(tag)
                completion_tokens += len(seq.token_ids)
                yield chunk([completion_choice(tag, event.text, seq.finish_reason, job.chat, delta=True)])
                if len(ended) == n:
                    if job.include_usage:
                        yield chunk([], usage=usage(job.prompt_tokens, completion_tokens))
                    break
            elif event.text:
                yield chunk([completion_choice(tag, event.text, None, job.chat, delta=True)])
            item = await queue.get()  # a disconnect cancels this generator (Starlette listens)
        yield sse("[DONE]")
    finally:
        if len(ended) < n:
            runner.cancel(ids)
