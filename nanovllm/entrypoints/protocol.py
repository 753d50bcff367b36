"""OpenAI request bodies (plus vLLM's extra sampling fields) and their translation to SamplingParams.

Unknown fields are ignored, as OpenAI's clients send some this engine has no use for; a field that
asks for behaviour the engine lacks (echo, suffix, best_of above n) is refused with a 400 rather than silently ignored.
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, WrapValidator

from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.validation import chat_messages, token_id_keys

MAX_N = 64
# vLLM's default max_logprobs (and OpenAI's top_logprobs limit): every returned alternative is a decoded token
# in every step's output, so a vocabulary-sized count would stall the engine loop for every client.
MAX_LOGPROBS = 20
# Every step checks each completion's text against every stop string (and its token against every stop
# token id): 100k stop strings cost ~40 ms per completion per step on the CPU box, for every client.
# OpenAI allows 4 stop strings; these caps leave room and bound that work.
MAX_STOP_STRINGS = 64
MAX_STOP_TOKEN_IDS = 1024
# vLLM's penalty fields: a null (or absent) one keeps SamplingParams' neutral default.
PENALTY_FIELDS = ("repetition_penalty", "presence_penalty", "frequency_penalty")


class ApiError(Exception):
    """An error answered with OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _checked_logprobs(name: str, value: int | None) -> int | None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise ApiError(400, f"{name} must be in [0, {MAX_LOGPROBS}], got {value}", name)
    return value


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class SamplingRequest(BaseModel):
    """Numbers and flags are strict, as OpenAI's API: `"max_tokens": true` or `"temperature": "0.5"` is a 400,
    not a silent 1 or 0.5 (an int is still a valid float)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: StrictInt | None = None
    temperature: StrictFloat = 1.0
    top_p: StrictFloat = 1.0
    n: StrictInt = 1
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # vLLM's extra sampling fields
    top_k: StrictInt = -1
    min_p: StrictFloat = 0.0
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = 0
    stop_token_ids: list[StrictInt] | None = None
    repetition_penalty: StrictFloat | None = None
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    logit_bias: dict[str, StrictFloat] | None = None

    def _logprobs(self) -> int | None:
        raise NotImplementedError

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def check_n(self) -> None:
        if not 1 <= self.n <= MAX_N:
            raise ApiError(400, f"n must be in [1, {MAX_N}], got {self.n}", "n")

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """The request's SamplingParams, n included: the engine runs the n choices as one request."""
        penalties = {name: getattr(self, name) for name in PENALTY_FIELDS if getattr(self, name) is not None}
        stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop
        stop_token_ids = self.stop_token_ids or []
        for name, values, limit in (("stop", stop, MAX_STOP_STRINGS), ("stop_token_ids", stop_token_ids, MAX_STOP_TOKEN_IDS)):
            if len(values) > limit:
                raise ApiError(400, f"{name} has {len(values)} entries; at most {limit} are allowed", name)
        logit_bias = token_id_keys(self.logit_bias) if self.logit_bias else None
        try:
            return SamplingParams(
                temperature=self.temperature,
                top_k=self.top_k if self.top_k not in (0, None) else -1,
                top_p=self.top_p,
                min_p=self.min_p,
                n=self.n,
                seed=self.seed,
                max_tokens=default_max_tokens if self._max_tokens() is None else self._max_tokens(),
                min_tokens=self.min_tokens,
                ignore_eos=self.ignore_eos,
                stop_token_ids=stop_token_ids,
                stop=stop,
                logprobs=self._logprobs(),
                logit_bias=logit_bias,
                **penalties,
            )
        except (ValueError, TypeError) as error:
            raise ApiError(400, str(error)) from error

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def _token_ids_at_once(value: Any, validate: Any) -> Any:
    """A list of plain ints is a token-id prompt, as the union would find after trying (and failing)
    every other member id by id; anything else goes through the union (its errors included)."""
    if type(value) is list and set(map(type, value)) == {int}:
        return value
    return validate(value)


class CompletionRequest(SamplingRequest):
    prompt: Annotated[str | list[str] | list[int] | list[list[int]], WrapValidator(_token_ids_at_once)]
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: str | None = None
    best_of: StrictInt | None = None

    def _logprobs(self) -> int | None:
        return _checked_logprobs("logprobs", self.logprobs)

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one string, a list of strings, one token-id list or a list of them."""
        if self.echo:
            raise ApiError(400, "echo is not supported by this engine", "echo")
        if self.suffix:
            raise ApiError(400, "suffix is not supported by this engine", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, f"best_of={self.best_of} is not supported by this engine (it returns n={self.n} samples, not the best of more)", "best_of")
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        if not prompt:
            raise ApiError(400, "prompt is empty", "prompt")
        return list(prompt)


class ChatCompletionRequest(SamplingRequest):
    messages: list[dict[str, Any]]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def _logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        return _checked_logprobs("top_logprobs", self.top_logprobs or 0) if self.logprobs else None

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_tokens is None else self.max_tokens

    def conversation(self) -> list[dict[str, Any]]:
        """Messages as the chat template wants them: a str role and text content (text parts are joined).
        Refuses tool calling and structured output, which the engine lacks (it would answer in free text)."""
        if self.tools and self.tool_choice != "none":
            raise ApiError(400, "tools are not supported by this engine (send no tools, or tool_choice='none')", "tools")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise ApiError(400, f"response_format {self.response_format.get('type')!r} is not supported by this engine (only 'text')", "response_format")
        try:
            return chat_messages(self.messages)
        except (TypeError, ValueError) as error:
            raise ApiError(400, str(error), "messages") from error
