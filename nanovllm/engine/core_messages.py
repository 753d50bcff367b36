"""The typed messages between the API process (EngineClient) and the engine process (EngineCore):
Commands over a multiprocessing pipe, Updates back over a socket (update_channel.py). The client
sends the commands of one event-loop turn as one pipe message (a burst of arrivals costs one pickle,
one write and one wake-up of the engine's reader, not one per request). Per engine step
the core sends at most ONE Update that carries every request's new outputs (fewer, merged ones when
the API process falls behind), so the API process pays one receive and one wake-up per step at most."""
from __future__ import annotations

from dataclasses import dataclass, field

from nanovllm.engine.requests import Prompt
from nanovllm.outputs import Logprob
from nanovllm.sampling_params import SamplingParams


class QueueFull(RuntimeError):
    """The engine already holds `max_waiting` requests that wait for a place in a batch."""


class EngineStopped(RuntimeError):
    """The engine was closed, or failed; it takes no more requests."""


# ---- API process -> engine process ----------------------------------------------------------


@dataclass(frozen=True)
class AddRequest:
    request_id: int  # chosen by the client, unique per client
    prompt: Prompt
    params: SamplingParams


@dataclass(frozen=True)
class AbortRequest:
    request_id: int


@dataclass(frozen=True)
class Stop:
    """End every live request with finish_reason "abort", then exit the engine."""


# One pipe message: commands applied in order (each add refused or accepted on its own).
Commands = list[AddRequest | AbortRequest | Stop]


# ---- engine process -> API process ----------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """The engine is built: what the API process needs to know of it."""

    model: str  # the model folder as Config resolved it (the tokenizer is loaded from it)
    max_model_len: int
    has_tokenizer: bool


@dataclass(frozen=True)
class Accepted:
    request_id: int
    num_prompt_tokens: int


@dataclass(frozen=True)
class Refused:
    request_id: int
    error: Exception  # ValueError / TypeError (bad request), QueueFull or EngineStopped


@dataclass
class Output:
    """What one completion of a request produced since its previous Output; its last one has `finished`."""

    request_id: int
    completion_index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None  # as the engine recorded them (decoded token text included)
    finished: bool
    finish_reason: str | None

    def __reduce__(self) -> tuple:
        """Pickled as its fields (a third of the bytes, 3x faster to load than a dataclass's default
        __dict__ state): the API process unpickles one Output per stream per step."""
        return Output, (self.request_id, self.completion_index, self.text, self.token_ids, self.logprobs, self.finished, self.finish_reason)


def merge_outputs(outputs: list[Output]) -> list[Output]:
    """One Output per (request, completion), in order of first appearance: texts, token ids and
    logprobs concatenated; finished and finish_reason from the last."""
    groups: dict[tuple[int, int], list[Output]] = {}
    for output in outputs:
        groups.setdefault((output.request_id, output.completion_index), []).append(output)
    merged = []
    for group in groups.values():
        if len(group) == 1:
            merged.append(group[0])
            continue
        last = group[-1]
        logprobs = None if last.logprobs is None else [entry for o in group for entry in o.logprobs]
        merged.append(Output(last.request_id, last.completion_index, "".join(o.text for o in group),
                             [t for o in group for t in o.token_ids], logprobs, last.finished, last.finish_reason))
    return merged


@dataclass(frozen=True)
class LoopStats:
    """The engine's scheduler state after a step (read by /metrics)."""

    num_running: int = 0
    num_waiting: int = 0
    num_blocks_used: int = 0
    num_blocks_total: int = 0


@dataclass
class Update:
    """Everything one turn of the engine loop produced: answers to adds, every request's new outputs, the stats."""

    stats: LoopStats
    accepted: list[Accepted] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)


@dataclass(frozen=True)
class Failed:
    """The engine raised (while loading or stepping); the process exits non-zero after sending this."""

    reason: str
