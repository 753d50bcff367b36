"""Offline batch inference over a JSONL file, on this machine or data-parallel over Ray replicas.

Input: one JSON object a line, {"prompt": text or token ids, any SamplingParams field}. Output: one
JSON object per input line, in input order: {"row", "text", "token_ids", "finish_reason"}, or
{"row", "error"} for a line that is not valid JSON, has an unknown or bad field, or holds a prompt
the engine rejects; the other rows run. The fields are the first completion's; with n > 1,
"outputs" lists all n; with logprobs, "logprobs" holds one {token id: logprob} per token. With one replica and no cluster address the rows run
here through `LLM.generate`, a batch at a time, and Ray is never imported; otherwise
`nanovllm.entrypoints.replicas` runs them on Ray actors.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from itertools import islice
from typing import IO

from tqdm.auto import tqdm

from nanovllm.entrypoints.cli import engine_kwargs, main as cli_main
from nanovllm.llm import LLM
from nanovllm.outputs import CompletionOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.validation import require_int, require_number, token_id_keys

SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams) if f.init)


@dataclass
class Row:
    """One input line: its prompt and sampling fields (names checked, values not yet), or why it has none."""

    row: int
    prompt: object = None
    sampling: dict = field(default_factory=dict)
    error: str | None = None


@dataclass
class BatchDone:
    """One batch of rows finished by `replica` (a name), with its output records; times are time.time()."""

    replica: str
    records: list[dict]
    started: float
    finished: float

    @property
    def num_tokens(self) -> int:
        return sum(len(record.get("token_ids", ())) for record in self.records)


@dataclass
class BatchSummary:
    """What a run did: rows written, error records among them, tokens generated, and the replica
    failures it survived (batches re-run after their replica died, replicas lost)."""

    num_rows: int = 0
    num_errors: int = 0
    num_tokens: int = 0
    elapsed_s: float = 0.0
    rerun_batches: int = 0
    dead_replicas: list[str] = field(default_factory=list)


def parse_line(row: int, line: bytes) -> Row:
    """Decode one input line into a Row; anything wrong with its shape becomes the Row's error (its
    values are checked where the engine is: `run_rows`)."""
    if not line.strip():
        return Row(row, error="the line is empty")
    try:
        obj = json.loads(line)
    except ValueError as exc:
        return Row(row, error=f"line is not valid JSON: {exc}")
    if not isinstance(obj, dict):
        return Row(row, error=f"a line must be a JSON object, got {type(obj).__name__}")
    if "prompt" not in obj:
        return Row(row, error="the object has no 'prompt'")
    unknown = sorted(set(obj) - {"prompt", *SAMPLING_FIELDS})
    if unknown:
        return Row(row, error=f"unknown field(s) {unknown}; valid fields are {['prompt', *SAMPLING_FIELDS]}")
    if isinstance(obj.get("logit_bias"), dict):
        obj["logit_bias"] = token_id_keys(obj["logit_bias"])
    prompt = obj.pop("prompt")
    return Row(row, prompt, obj)


def read_batches(path: str, batch_size: int) -> Iterator[list[Row]]:
    """The file's rows, parsed, `batch_size` at a time (lazily: the input may not fit in memory)."""
    with open(path, "rb") as file:
        rows = (parse_line(row, line) for row, line in enumerate(file))
        while batch := list(islice(rows, batch_size)):
            yield batch


def run_rows(llm: LLM, rows: list[Row]) -> list[dict]:
    """Output records for `rows`, in their order. A row's sampling fields override the checkpoint's
    generation_config.json defaults, as for `generate` without sampling_params. Each row is checked
    on its own, so a bad value or a prompt the engine rejects (too long, a token id outside the
    vocabulary) costs only that row; the valid ones are generated together."""
    errors: dict[int, str] = {}
    valid: list[tuple[Row, list[int], SamplingParams]] = []
    for row in rows:
        if row.error is not None:
            errors[row.row] = row.error
            continue
        try:
            checked = llm.validate([row.prompt], replace(llm.default_sampling_params, **row.sampling))
        except (TypeError, ValueError) as exc:
            errors[row.row] = str(exc)
            continue
        [(_, token_ids, params)] = checked
        valid.append((row, token_ids, params))
    outputs = llm.generate([token_ids for _, token_ids, _ in valid], [params for *_, params in valid], use_tqdm=False) if valid else []
    records = {row: {"row": row, "error": error} for row, error in errors.items()}
    for (row, _, params), output in zip(valid, outputs):
        completions = [_completion_record(completion) for completion in output.outputs]
        records[row.row] = {"row": row.row, **completions[0], **({"outputs": completions} if params.n > 1 else {})}
    return [records[row.row] for row in rows]


def _completion_record(completion: CompletionOutput) -> dict:
    """text, token_ids, finish_reason (+ logprobs as one {token id: logprob} per generated token)."""
    record = {"text": completion.text, "token_ids": completion.token_ids, "finish_reason": completion.finish_reason}
    if completion.logprobs is not None:
        record["logprobs"] = [{str(token_id): lp.logprob for token_id, lp in step.items()} for step in completion.logprobs]
    return record


def run_local(llm: LLM, batches: Iterable[list[Row]]) -> Iterator[BatchDone]:
    for rows in batches:
        started = time.time()
        records = run_rows(llm, rows)
        yield BatchDone("local", records, started, time.time())


class OrderedWriter:
    """Writes records in row order whatever order they arrive in, each row exactly once."""

    def __init__(self, file: IO[str]) -> None:
        self.file = file
        self.next_row = 0
        self.waiting: dict[int, dict] = {}

    def add(self, record: dict) -> None:
        row = record["row"]
        if row < self.next_row or row in self.waiting:
            raise RuntimeError(f"row {row} was produced twice")
        self.waiting[row] = record
        while self.next_row in self.waiting:
            self.file.write(json.dumps(self.waiting.pop(self.next_row), ensure_ascii=False) + "\n")
            self.next_row += 1

    def check_complete(self, num_rows: int) -> None:
        if self.waiting or self.next_row != num_rows:
            raise RuntimeError(f"{num_rows - self.next_row} of {num_rows} rows have no output (first missing: row {self.next_row})")


def count_lines(path: str) -> int:
    with open(path, "rb") as file:
        return sum(1 for _ in file)


def run_batch(
    model: str,
    input_path: str,
    output_path: str,
    replicas: int = 1,
    address: str | None = None,
    batch_size: int = 256,
    cpus_per_replica: float = 1.0,
    batch_timeout_s: float | None = None,
    max_restarts: int | None = None,
    on_batch_done: Callable[[BatchDone], None] | None = None,
    use_tqdm: bool = True,
    **engine_kwargs: object,
) -> BatchSummary:
    """Run every line of `input_path` and write `output_path` (see the module docstring).

    replicas == 1 and no `address`: here, without Ray. Otherwise `replicas` engines on a Ray
    cluster (`address`, or a local one started for this run), each owning tensor_parallel_size
    GPUs of one node (or `cpus_per_replica` CPUs without GPUs); see `replicas.ReplicaPool`. A replica
    that dies has its batch re-run by another and is replaced, up to `max_restarts` times (default:
    `replicas`); a batch running longer than `batch_timeout_s` has its replica killed.
    `on_batch_done` sees every finished batch (after the next one was handed to its replica).
    The output appears only when complete: it is written next to its final name, then renamed.
    """
    require_int("replicas", replicas, 1)
    require_int("batch_size", batch_size, 1)
    require_number("cpus_per_replica", cpus_per_replica, 0.0, low_open=True)
    if batch_timeout_s is not None:
        require_number("batch_timeout_s", batch_timeout_s, 0.0, low_open=True)
    max_restarts = replicas if max_restarts is None else max_restarts
    require_int("max_restarts", max_restarts, 0)
    num_rows = count_lines(input_path)
    batches = read_batches(input_path, batch_size)
    summary = BatchSummary()
    start = time.perf_counter()
    partial_path = output_path + ".partial"
    bar = tqdm(total=num_rows, unit="row", desc="Batch", dynamic_ncols=True, disable=not use_tqdm)
    try:
        with open(partial_path, "w", encoding="utf-8") as file:
            writer = OrderedWriter(file)
            with _open_runner(model, engine_kwargs, replicas, address, cpus_per_replica, batch_timeout_s, max_restarts, summary) as run:
                for done in run(batches):
                    for record in done.records:
                        writer.add(record)
                    summary.num_errors += sum("error" in record for record in done.records)
                    summary.num_tokens += done.num_tokens
                    bar.update(len(done.records))
                    bar.set_postfix(tok_per_s=f"{summary.num_tokens / (time.perf_counter() - start):.0f}")
                    if on_batch_done is not None:
                        on_batch_done(done)
            writer.check_complete(num_rows)
        os.replace(partial_path, output_path)
    finally:
        bar.close()
        if os.path.exists(partial_path):
            os.remove(partial_path)
    summary.num_rows = num_rows
    summary.elapsed_s = time.perf_counter() - start
    return summary


@contextmanager
def _open_runner(model: str, engine_kwargs: dict, replicas: int, address: str | None, cpus_per_replica: float,
                 batch_timeout_s: float | None, max_restarts: int, summary: BatchSummary) -> Iterator[Callable[[Iterable[list[Row]]], Iterator[BatchDone]]]:
    """`run(batches) -> Iterator[BatchDone]` over one local engine, or over a Ray replica pool."""
    if replicas == 1 and address is None:
        llm = LLM(model, **engine_kwargs)
        try:
            yield lambda batches: run_local(llm, batches)
        finally:
            llm.exit()
        return
    from nanovllm.entrypoints.replicas import ReplicaPool

    pool = ReplicaPool(model, engine_kwargs, replicas, address, cpus_per_replica, batch_timeout_s, max_restarts)
    try:
        yield pool.run
    finally:
        pool.close()
        summary.rerun_batches = pool.rerun_batches
        summary.dead_replicas = pool.dead_replicas


# ---- command line (`nanovllm batch`; the flags are in entrypoints/cli.py) ----------------


def run(args: argparse.Namespace) -> int:
    summary = run_batch(
        args.model, args.input, args.output, replicas=args.replicas, address=args.address, batch_size=args.batch_size,
        cpus_per_replica=args.cpus_per_replica, batch_timeout_s=args.batch_timeout, max_restarts=args.max_restarts,
        use_tqdm=not args.no_progress, **engine_kwargs(args),
    )
    print(
        f"{summary.num_rows} rows ({summary.num_errors} errors), {summary.num_tokens} tokens in {summary.elapsed_s:.1f} s"
        f" ({summary.num_tokens / max(summary.elapsed_s, 1e-9):.0f} tok/s)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(["batch", *sys.argv[1:]]))
