"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over one EngineLoop: every HTTP request becomes
engine requests (one per prompt, with the request's n) that share decode steps with everyone else's."""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import signal
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

from nanovllm.engine.engine_loop import EngineLoop, EngineStopped, Output, QueueFull, RequestStream
from nanovllm.engine.llm_engine import LLMEngine
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
    engine_loop: EngineLoop
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

    def add(self, output: Output) -> None:
        self.timer.record(output)
        self.text += output.text
        self.num_tokens += len(output.token_ids)
        if output.logprobs is not None:
            self.logprobs += zip(output.token_ids, output.logprobs)
        self.finish_reason = output.finish_reason


@dataclass
class Submitted:
    """One engine request (a prompt with SamplingParams.n) and its n choices, by completion index."""

    stream: RequestStream
    choices: list[Choice]

    def close(self) -> None:
        """Abort the engine request if it is still running (client gone, another prompt refused, shutdown)."""
        if self.stream.close():
            for choice in self.choices:
                if choice.finish_reason is None:
                    choice.timer.metrics.requests.labels("abort").inc()


def _all_choices(submitted: list[Submitted]) -> list[Choice]:
    return [choice for request in submitted for choice in request.choices]


def _usage(submitted: list[Submitted]) -> dict:
    prompt = sum(request.stream.accepted.num_prompt_tokens for request in submitted)
    completion = sum(choice.num_tokens for choice in _all_choices(submitted))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _submit(state: ServerState, request: SamplingRequest, prompts: list, default_max_tokens: int) -> list[Submitted]:
    """One engine request per prompt, with the request's n (the engine prefills each prompt once and
    seeds continuation i from the seed, as offline `generate` does); all accepted or none (a refusal
    closes the others). Choice i * n + j is completion j of prompt i."""
    if request.model is not None and request.model != state.model_name:
        raise ApiError(400, f"model {request.model!r} is not served here; the model is {state.model_name!r}", "model", "model_not_found")
    request.check_n()
    params = request.sampling_params(default_max_tokens)
    submitted: list[Submitted] = []
    try:
        for i, prompt in enumerate(prompts):
            choices = [Choice(i * params.n + j, RequestTimer(state.metrics)) for j in range(params.n)]
            try:
                stream = await RequestStream.open(state.engine_loop, prompt, params)
            except (ValueError, TypeError) as error:
                raise ApiError(400, str(error), "prompt") from error
            except (QueueFull, EngineStopped) as error:
                raise ApiError(503, str(error)) from error
            state.metrics.prompt_tokens.inc(stream.accepted.num_prompt_tokens)
            submitted.append(Submitted(stream, choices))
    except BaseException:
        for done in submitted:
            done.close()
        raise
    return submitted


async def _merged(submitted: list[Submitted]) -> AsyncIterator[tuple[Choice, Output]]:
    """Every choice's outputs as they come (one task per engine request feeding one queue)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(request: Submitted) -> None:
        try:
            async for output in request.stream:
                await queue.put((request.choices[output.completion_index], output))
        except EngineStopped as error:
            await queue.put((None, error))

    tasks = [asyncio.create_task(pump(request)) for request in submitted]
    try:
        live = len(_all_choices(submitted))
        while live:
            choice, item = await queue.get()
            if isinstance(item, EngineStopped):
                raise item
            choice.add(item)
            live -= item.finished
            yield choice, item
    finally:
        for task in tasks:
            task.cancel()


async def _until_disconnected(http_request: Request) -> None:
    while (await http_request.receive())["type"] != "http.disconnect":
        pass


async def _collect(http_request: Request, submitted: list[Submitted]) -> None:
    """Run every choice to its end; a client that disconnects first aborts them all."""
    async def drain() -> None:
        async for _ in _merged(submitted):
            pass

    work = asyncio.create_task(drain())
    watcher = asyncio.create_task(_until_disconnected(http_request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        work.cancel()
        for request in submitted:
            request.close()
    if not work.done() or work.cancelled():
        raise ApiError(499, "the client disconnected")  # nginx's "client closed request": nobody reads it
    try:
        work.result()
    except EngineStopped as error:
        raise ApiError(503, str(error)) from error


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _streaming_response(submitted: list[Submitted], include_usage: bool, header: dict, render) -> StreamingResponse:
    """SSE: one event per output (`render(choice, output)` makes its choice entry), then usage if asked, then [DONE]."""

    async def events() -> AsyncIterator[str]:
        try:
            async for choice, output in _merged(submitted):
                entry = render(choice, output)
                if entry is not None:
                    yield _sse({**header, "choices": [entry]})
            if include_usage:
                yield _sse({**header, "choices": [], "usage": _usage(submitted)})
        except EngineStopped as error:
            yield _sse(ApiError(503, str(error)).body)
        finally:
            for request in submitted:
                request.close()
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")


def build_app(engine_loop: EngineLoop, model_name: str, api_key: str | None = None, max_body_bytes: int = 1 << 20) -> FastAPI:
    """The ASGI app; its shutdown closes `engine_loop` (aborting what is still running)."""
    engine = engine_loop.engine
    if engine.tokenizer is None:
        raise ValueError("the server needs the model's tokenizer (chat template, text outputs); start it without skip_tokenizer_init")
    # The engine's tokenizer, shared: the event loop renders and encodes chat templates while the engine
    # thread encodes prompts and decodes outputs. A fast (Rust) tokenizer encodes and decodes under shared
    # borrows; only a change of its truncation/padding settings mutates it, which the first plain encode
    # makes if tokenizer.json declares any: that first encode happens here, before any request runs.
    engine.tokenizer.encode("")
    state = ServerState(engine_loop, engine.tokenizer, model_name, engine.config.max_model_len, ServerMetrics(engine_loop))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(engine_loop.close)

    def require_key(request: Request) -> None:
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
        return Response(status_code=200 if engine_loop.is_alive() else 503)

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

        def entry(choice: Choice, output: Output) -> dict:
            logprobs = None
            if output.logprobs is not None:
                logprobs = completion_logprobs(list(zip(output.token_ids, output.logprobs)), len(choice.text) - len(output.text))
            return {"index": choice.index, "text": output.text, "logprobs": logprobs, "finish_reason": output.finish_reason}

        if body.stream:
            return _streaming_response(submitted, body.include_usage, header, entry)
        await _collect(http_request, submitted)
        results = [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                    "logprobs": completion_logprobs(c.logprobs, 0) if body.logprobs is not None else None}
                   for c in _all_choices(submitted)]
        return {**header, "choices": results, "usage": _usage(submitted)}

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http_request: Request):
        try:
            prompt = state.tokenizer.apply_chat_template(body.conversation(), add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        except (jinja2.TemplateError, ValueError) as error:
            raise ApiError(400, f"the chat template failed on these messages: {error}", "messages") from error
        submitted = await _submit(state, body, [prompt], state.max_model_len)
        header = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name}

        def entry(choice: Choice, output: Output) -> dict | None:
            first = choice.num_tokens == len(output.token_ids)
            if not output.text and not output.finished and not first:
                return None
            delta = {"role": "assistant", "content": output.text} if first else {"content": output.text}
            logprobs = chat_logprobs(list(zip(output.token_ids, output.logprobs)), body.top_logprobs or 0) if body.logprobs else None
            return {"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": output.finish_reason}

        if body.stream:
            return _streaming_response(submitted, body.include_usage, header, entry)
        await _collect(http_request, submitted)
        results = [{"index": c.index, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                    "logprobs": chat_logprobs(c.logprobs, body.top_logprobs or 0) if body.logprobs else None}
                   for c in _all_choices(submitted)]
        return {**header, "object": "chat.completion", "choices": results, "usage": _usage(submitted)}

    app.include_router(v1)
    return app


class _Server(uvicorn.Server):
    """uvicorn's server, whose shutdown (SIGTERM, SIGINT) gives in-flight requests `grace_s` seconds and
    then ends them through the engine loop (finish_reason "abort"), so every stream still ends with
    [DONE] before uvicorn closes the connections."""

    def __init__(self, config: uvicorn.Config, engine_loop: EngineLoop, grace_s: float) -> None:
        super().__init__(config)
        self.engine_loop = engine_loop
        self.grace_s = grace_s

    async def shutdown(self, sockets=None) -> None:
        async def end_in_flight() -> None:
            await asyncio.sleep(self.grace_s)
            await asyncio.to_thread(self.engine_loop.close)

        ender = asyncio.create_task(end_in_flight())
        try:
            await super().shutdown(sockets)
        finally:
            ender.cancel()


def _exit_cleanly(signum: int, frame: object) -> None:
    """SIGTERM outside uvicorn's own handling (while loading, or re-raised by uvicorn after its graceful
    shutdown): unwind normally so finalizers stop workers and free shared memory; exit status 0."""
    raise SystemExit(0)


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _exit_cleanly)
    engine = LLMEngine(args.model, **engine_kwargs(args))
    engine_loop = EngineLoop(engine, args.max_waiting)
    try:
        app = build_app(engine_loop, args.served_model_name or args.model, args.api_key, args.max_body_bytes)
        # uvicorn's own limit is a backstop: the engine loop ends every request at shutdown_timeout.
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                timeout_graceful_shutdown=args.shutdown_timeout + 10)
        _Server(config, engine_loop, args.shutdown_timeout).run()
    finally:
        engine_loop.close()
    return 0
