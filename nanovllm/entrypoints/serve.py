"""OpenAI-compatible HTTP server (FastAPI + uvicorn) in this process over one engine process
(EngineClient): every HTTP request becomes engine requests (one per prompt, with the request's n) that
share decode steps with everyone else's. HTTP, JSON and SSE work never takes the engine's GIL."""
from __future__ import annotations

import argparse
import asyncio
import gc
import hmac
import json
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import jinja2
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from transformers import PreTrainedTokenizerBase

from nanovllm.engine.engine_client import EngineClient, EngineStopped, Output, OutputStream, QueueFull
from nanovllm.engine.requests import load_tokenizer
from nanovllm.entrypoints.cli import engine_kwargs
from nanovllm.entrypoints.metrics import RequestTimer, ServerMetrics
from nanovllm.entrypoints.protocol import ApiError, ChatCompletionRequest, CompletionRequest, SamplingRequest
from nanovllm.entrypoints.responses import TokenLogprobs, chat_logprobs, completion_logprobs

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context limit


class BodySizeLimit:
    """ASGI middleware: a request body above `max_bytes` gets 413 before the app reads any of it."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_large = declared is not None and declared.isdigit() and int(declared) > self.max_bytes
        body, more = b"", not too_large
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            too_large = len(body) > self.max_bytes
            more = more and not too_large
        if too_large:
            error = ApiError(413, f"request body is larger than the limit of {self.max_bytes} bytes")
            return await JSONResponse(error.body, error.status)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


@dataclass
class ServerState:
    client: EngineClient
    tokenizer: PreTrainedTokenizerBase
    model_name: str
    max_model_len: int
    metrics: ServerMetrics
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Choice:
    """One completion of an engine request: one choice of the response."""

    index: int
    timer: RequestTimer
    text: str = ""
    num_tokens: int = 0
    logprobs: TokenLogprobs = field(default_factory=list)
    finish_reason: str | None = None
    tokens_text_len: int = 0  # of the decoded texts of the tokens with logprobs (completions' text_offset counts in them)
    latest_text_offset: int = 0  # the text_offset of the latest output's first token

    def add(self, output: Output) -> None:
        self.timer.record(output)
        self.text += output.text
        self.num_tokens += len(output.token_ids)
        if output.logprobs is not None:
            self.latest_text_offset = self.tokens_text_len
            self.tokens_text_len += sum(len(entry[token].decoded_token) for token, entry in zip(output.token_ids, output.logprobs))
            self.logprobs += zip(output.token_ids, output.logprobs)
        self.finish_reason = output.finish_reason


@dataclass
class Submitted:
    """An HTTP request's engine requests (one per prompt): their OutputStream, and their choices by
    (request id, completion index), in choice order."""

    stream: OutputStream
    choices: dict[tuple[int, int], Choice] = field(default_factory=dict)
    num_prompt_tokens: int = 0

    def close(self) -> None:
        """Abort the engine requests still running (client gone, another prompt refused, shutdown)."""
        for request_id in self.stream.close():
            for (owner, _), choice in self.choices.items():
                if owner == request_id and choice.finish_reason is None:
                    choice.timer.metrics.requests.labels("abort").inc()


def _usage(submitted: Submitted) -> dict:
    prompt = submitted.num_prompt_tokens
    completion = sum(choice.num_tokens for choice in submitted.choices.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _submit(state: ServerState, request: SamplingRequest, prompts: list, default_max_tokens: int) -> Submitted:
    """One engine request per prompt, with the request's n (the engine prefills each prompt once and
    seeds continuation i from the seed, as offline `generate` does); all accepted or none (a refusal
    closes the others). Choice i * n + j is completion j of prompt i."""
    if request.model is not None and request.model != state.model_name:
        raise ApiError(400, f"model {request.model!r} is not served here; the model is {state.model_name!r}", "model", "model_not_found")
    request.check_n()
    params = request.sampling_params(default_max_tokens)
    submitted = Submitted(OutputStream(state.client))
    try:
        for i, prompt in enumerate(prompts):
            timers = [RequestTimer(state.metrics) for _ in range(params.n)]
            try:
                accepted = await submitted.stream.add(prompt, params)
            except (ValueError, TypeError) as error:
                raise ApiError(400, str(error), "prompt") from error
            except (QueueFull, EngineStopped) as error:
                raise ApiError(503, str(error)) from error
            state.metrics.prompt_tokens.inc(accepted.num_prompt_tokens)
            submitted.num_prompt_tokens += accepted.num_prompt_tokens
            for j, timer in enumerate(timers):
                submitted.choices[accepted.request_id, j] = Choice(i * params.n + j, timer)
    except BaseException:
        submitted.close()
        raise
    return submitted


async def _outputs(submitted: Submitted) -> AsyncIterator[list[tuple[Choice, Output]]]:
    """Every choice's outputs, a batch per wake-up (what arrived since the previous one, merged per choice)."""
    async for batch in submitted.stream.batches():
        pairs = []
        for output in batch:
            choice = submitted.choices[output.request_id, output.completion_index]
            choice.add(output)
            pairs.append((choice, output))
        yield pairs


async def _until_disconnected(http_request: Request) -> None:
    while (await http_request.receive())["type"] != "http.disconnect":
        pass


async def _collect(http_request: Request, submitted: Submitted) -> None:
    """Run every choice to its end; a client that disconnects first aborts them all."""
    async def drain() -> None:
        async for _ in _outputs(submitted):
            pass

    work = asyncio.create_task(drain())
    watcher = asyncio.create_task(_until_disconnected(http_request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        work.cancel()
        submitted.close()
    if not work.done() or work.cancelled():
        raise ApiError(499, "the client disconnected")  # nginx's "client closed request": nobody reads it
    try:
        work.result()
    except EngineStopped as error:
        raise ApiError(503, str(error)) from error


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _streaming_response(submitted: Submitted, include_usage: bool, header: dict, render) -> StreamingResponse:
    """SSE: one event per choice that got output, all events of one wake-up in one write; then usage if
    asked, then [DONE]. `render(choice, output)` gives the choice entry as JSON text (or None for no
    event): the header part of the events is encoded once per response, not once per event."""
    prefix = f'data: {json.dumps(header)[:-1]}, "choices": ['

    async def events() -> AsyncIterator[bytes]:
        try:
            async for pairs in _outputs(submitted):
                entries = [entry for choice, output in pairs if (entry := render(choice, output)) is not None]
                if entries:
                    yield "".join(f"{prefix}{entry}]}}\n\n" for entry in entries).encode()
            if include_usage:
                yield _sse({**header, "choices": [], "usage": _usage(submitted)}).encode()
        except EngineStopped as error:
            yield _sse(ApiError(503, str(error)).body).encode()
        finally:
            submitted.close()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def build_app(client: EngineClient, model_name: str, api_key: str | None = None, max_body_bytes: int = 1 << 20) -> FastAPI:
    """The ASGI app; its start-up routes the engine's outputs to its event loop, its shutdown closes
    `client` (aborting what is still running)."""
    if not client.ready.has_tokenizer:
        raise ValueError("the server needs the model's tokenizer (chat template, text outputs); start it without skip_tokenizer_init")
    tokenizer = load_tokenizer(client.ready.model)  # this process's own: chat templates, on the event loop only
    state = ServerState(client, tokenizer, model_name, client.ready.max_model_len, ServerMetrics(client))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client.bind(asyncio.get_running_loop())
        gc.collect()
        gc.freeze()  # the libraries' objects: later full collections scan only what serving made (no long pauses)
        yield
        await asyncio.to_thread(client.close)

    async def require_key(request: Request) -> None:  # async: a plain def would cost a thread-pool hop per request
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (send `Authorization: Bearer KEY`)", code="invalid_api_key")

    app = FastAPI(title="nanovllm", lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body, error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return JSONResponse(ApiError(400, f"invalid request body: {problems}").body, 400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(ApiError(error.status_code, str(error.detail)).body, error.status_code)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if client.is_alive() else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @v1.get("/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": state.created, "owned_by": "nanovllm", "max_model_len": state.max_model_len}
        return {"object": "list", "data": [card]}

    @v1.post("/completions")
    async def completions(body: CompletionRequest, http_request: Request):
        submitted = await _submit(state, body, body.prompts(), COMPLETION_DEFAULT_MAX_TOKENS)
        header = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": model_name}

        def entry(choice: Choice, output: Output) -> str:
            logprobs = "null"
            if output.logprobs is not None:
                logprobs = json.dumps(completion_logprobs(list(zip(output.token_ids, output.logprobs)), choice.latest_text_offset))
            return (f'{{"index": {choice.index}, "text": {json.dumps(output.text)}, "logprobs": {logprobs}, '
                    f'"finish_reason": {json.dumps(output.finish_reason)}}}')

        if body.stream:
            return _streaming_response(submitted, body.include_usage, header, entry)
        await _collect(http_request, submitted)
        results = [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                    "logprobs": completion_logprobs(c.logprobs, 0) if body.logprobs is not None else None}
                   for c in submitted.choices.values()]
        return {**header, "choices": results, "usage": _usage(submitted)}

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http_request: Request):
        try:
            prompt = state.tokenizer.apply_chat_template(body.conversation(), add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        except (jinja2.TemplateError, TypeError, ValueError) as error:
            raise ApiError(400, f"the chat template failed on these messages: {error}", "messages") from error
        submitted = await _submit(state, body, [prompt], state.max_model_len)
        header = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name}

        def entry(choice: Choice, output: Output) -> str | None:
            first = choice.num_tokens == len(output.token_ids)
            if not output.text and not output.finished and not first:
                return None
            role = '"role": "assistant", ' if first else ""
            logprobs = json.dumps(chat_logprobs(list(zip(output.token_ids, output.logprobs)), body.top_logprobs or 0)) if body.logprobs else "null"
            return (f'{{"index": {choice.index}, "delta": {{{role}"content": {json.dumps(output.text)}}}, "logprobs": {logprobs}, '
                    f'"finish_reason": {json.dumps(output.finish_reason)}}}')

        if body.stream:
            return _streaming_response(submitted, body.include_usage, header, entry)
        await _collect(http_request, submitted)
        results = [{"index": c.index, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                    "logprobs": chat_logprobs(c.logprobs, body.top_logprobs or 0) if body.logprobs else None}
                   for c in submitted.choices.values()]
        return {**header, "object": "chat.completion", "choices": results, "usage": _usage(submitted)}

    app.include_router(v1)
    return app


class _Server(uvicorn.Server):
    """uvicorn's server, whose shutdown (SIGTERM, SIGINT) gives in-flight requests `grace_s` seconds and
    then ends them through the engine (finish_reason "abort"), so every stream still ends with [DONE]
    before uvicorn closes the connections. If the engine process dies, it shuts down too (`failure`)."""

    def __init__(self, config: uvicorn.Config, client: EngineClient, grace_s: float) -> None:
        super().__init__(config)
        self.client = client
        self.grace_s = grace_s
        self.failure: str | None = None
        client.on_death = self._engine_died

    def _engine_died(self, reason: str) -> None:
        print(f"nanovllm serve: {reason}; shutting down", file=sys.stderr, flush=True)
        self.failure = reason
        self.should_exit = True

    async def shutdown(self, sockets=None) -> None:
        async def end_in_flight() -> None:
            await asyncio.sleep(self.grace_s)
            await asyncio.to_thread(self.client.close)

        ender = asyncio.create_task(end_in_flight())
        try:
            await super().shutdown(sockets)
        finally:
            ender.cancel()


def _exit_cleanly(signum: int, frame: object) -> None:
    """SIGTERM outside uvicorn's own handling (while loading, or re-raised by uvicorn after its graceful
    shutdown): unwind normally so the engine process is stopped and its shared memory freed; exit status 0."""
    raise SystemExit(0)


def run(args: argparse.Namespace) -> int:
    """Exit status 0 after a shutdown, 1 if the engine process died."""
    signal.signal(signal.SIGTERM, _exit_cleanly)
    client = EngineClient(args.model, engine_kwargs(args), args.max_waiting)
    try:
        app = build_app(client, args.served_model_name or args.model, args.api_key, args.max_body_bytes)
        # uvicorn's own limit is a backstop: the engine ends every request at shutdown_timeout.
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                timeout_graceful_shutdown=args.shutdown_timeout + 10)
        server = _Server(config, client, args.shutdown_timeout)
        server.run()
    finally:
        client.close()
    return 1 if server.failure else 0
