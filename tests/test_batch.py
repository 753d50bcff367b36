"""The JSONL batch runner: here without Ray, and over two Ray replicas on a local 2-CPU cluster."""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest
from conftest import make_llm, random_prompts
from serving import REPO

from nanovllm import SamplingParams
from nanovllm.entrypoints.batch import BatchDone, BatchSummary, OrderedWriter, run_batch

# make_llm's engine, so the runner's output can be compared with one offline generate call.
ENGINE = dict(device="cpu", kvcache_block_size=16, max_model_len=512, max_num_batched_tokens=1024, num_kvcache_blocks=256)


def good_rows(count: int, vocab: int) -> list[dict]:
    """Text and token-id prompts; mostly greedy, some seeded sampling (reproducible whatever the batch)."""
    prompts = random_prompts(count, 2, 24, vocab, seed=16)
    rows = []
    for i, prompt in enumerate(prompts):
        row: dict = {"prompt": f"batch row {i}: hello world" if i % 4 == 0 else prompt, "max_tokens": 3 + i % 5, "temperature": 0}
        if i % 3 == 0:
            row["ignore_eos"] = True
        if i % 7 == 0:
            row.update(temperature=0.8, top_k=20, seed=i)
        if i % 50 == 1:
            row.update(n=2, temperature=0.8, seed=i)
        if i % 50 == 2:
            row.update(logprobs=2, logit_bias={7: 3.0})  # JSON writes the key as "7"
        rows.append(row)
    return rows


# (line, words its error must contain); `max_model_len` is 512 and the tiny vocabulary has 2048 ids.
BAD_LINES = [
    ("{not json", "not valid JSON"),
    ("", "empty"),
    ("[1, 2, 3]", "JSON object"),
    ('{"max_tokens": 4}', "no 'prompt'"),
    ('{"prompt": [5, 6], "max_token": 4}', "max_token"),
    ('{"prompt": [5, 6], "temperature": -1}', "temperature"),
    (json.dumps({"prompt": [5] * 600}), "max_model_len=512"),
    ('{"prompt": [5, 99999]}', "99999"),
    ('{"prompt": 42}', "int"),
]


def write_input(path: pathlib.Path, rows: list[dict], bad_every: int) -> dict[int, str]:
    """Write `rows` with BAD_LINES spread among them; returns {line number: expected error words}."""
    lines, bad = [], {}
    good = iter(rows)
    for bad_line, words in BAD_LINES:
        lines += [json.dumps(row) for row in [next(good) for _ in range(bad_every)]]
        bad[len(lines)] = words
        lines.append(bad_line)
    lines += [json.dumps(row) for row in good]
    path.write_text("\n".join(lines) + "\n")
    return bad


def reference(tiny_model: str, rows: list[dict], **engine: object) -> list:
    """One offline generate over all rows."""
    llm = make_llm(tiny_model, **engine)
    try:
        params = [SamplingParams(**{k: v for k, v in row.items() if k != "prompt"}) for row in rows]
        return llm.generate([row["prompt"] for row in rows], params, use_tqdm=False)
    finally:
        llm.exit()


def check_output(path: pathlib.Path, expected: list, bad: dict[int, str]) -> None:
    """Every line once, in order; bad lines carry their error, the others equal `expected`'s outputs in order."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [record["row"] for record in records] == list(range(len(expected) + len(bad)))
    good = iter(expected)
    for record in records:
        if record["row"] in bad:
            assert set(record) == {"row", "error"} and bad[record["row"]] in record["error"], record
            continue
        want = next(good).outputs
        completions = record.get("outputs", [record])
        assert len(completions) == len(want) and (len(want) > 1) == ("outputs" in record), record["row"]
        for got, completion in zip(completions, want):
            assert (got["text"], got["token_ids"], got["finish_reason"]) == (completion.text, completion.token_ids, completion.finish_reason), record["row"]
            if completion.logprobs is None:
                assert "logprobs" not in got
                continue
            assert len(got["logprobs"]) == len(completion.logprobs)
            for step, want_step in zip(got["logprobs"], completion.logprobs):
                assert {int(token_id) for token_id in step} == set(want_step)
                assert all(step[str(token_id)] == pytest.approx(lp.logprob, abs=1e-4) for token_id, lp in want_step.items())


@pytest.fixture(scope="module")
def batch_input(tmp_path_factory: pytest.TempPathFactory, tiny_model: str, vocab_ids: int) -> tuple[pathlib.Path, list[dict], dict[int, str]]:
    rows = good_rows(200, vocab_ids)
    path = tmp_path_factory.mktemp("batch") / "prompts.jsonl"
    bad = write_input(path, rows, bad_every=17)
    return path, reference(tiny_model, rows), bad


# ---- one replica, no Ray ------------------------------------------------------------------


def test_cli_without_ray_equals_generate_and_bad_lines_get_errors(tiny_model: str, batch_input, tmp_path: pathlib.Path) -> None:
    path, expected, bad = batch_input
    output = tmp_path / "out.jsonl"
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in ENGINE.items()]
    script = (
        "import sys, torch\n"
        "torch.set_num_threads(1)  # as in conftest: the box is shared\n"
        "from nanovllm.entrypoints.cli import main\n"
        f"main({['batch', tiny_model, '--input', str(path), '--output', str(output), '--batch-size', '64', *flags]!r})\n"
        "assert 'ray' not in sys.modules, 'the local path imported ray'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{len(expected) + len(bad)} rows ({len(bad)} errors)" in done.stderr
    check_output(output, expected, bad)
    assert not os.path.exists(f"{output}.partial")


def test_rows_without_sampling_fields_take_the_checkpoints_defaults(tiny_model: str, vocab_ids: int, tmp_path: pathlib.Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    generation_config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**generation_config, "temperature": 0.0}))
    prompts = random_prompts(6, 3, 12, vocab_ids, seed=5)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": p, "max_tokens": 6, "ignore_eos": True}) + "\n" for p in prompts))
    run_batch(str(model), str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), use_tqdm=False, **ENGINE)
    greedy = reference(str(model), [{"prompt": p, "max_tokens": 6, "ignore_eos": True, "temperature": 0} for p in prompts])
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [record["token_ids"] for record in records] == [output.outputs[0].token_ids for output in greedy]


def test_module_entry_point_is_the_batch_subcommand() -> None:
    done = subprocess.run([sys.executable, "-m", "nanovllm.entrypoints.batch", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage: nanovllm batch" in done.stdout and "--replicas" in done.stdout and "--max-model-len" in done.stdout


def test_failed_run_leaves_no_output(tmp_path: pathlib.Path, batch_input) -> None:
    output = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match="not a directory"):
        run_batch(str(tmp_path / "no-model"), str(batch_input[0]), str(output), use_tqdm=False)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("setting, value, words", [
    ("replicas", 0, "replicas must be >= 1, got 0"),
    ("batch_size", 2.5, "batch_size must be an int"),
    ("cpus_per_replica", 0, "cpus_per_replica must be a finite number in (0.0"),
    ("batch_timeout_s", -1, "batch_timeout_s must be a finite number in (0.0"),
    ("max_restarts", -1, "max_restarts must be >= 0"),
])
def test_bad_run_settings_are_named(tmp_path: pathlib.Path, batch_input, tiny_model: str, setting: str, value: object, words: str) -> None:
    with pytest.raises((TypeError, ValueError), match=re.escape(words)):
        run_batch(tiny_model, str(batch_input[0]), str(tmp_path / "out.jsonl"), use_tqdm=False, **{setting: value})
    assert os.listdir(tmp_path) == []


def test_ordered_writer_writes_in_row_order_and_refuses_a_row_twice(tmp_path: pathlib.Path) -> None:
    with open(tmp_path / "out.jsonl", "w") as file:
        writer = OrderedWriter(file)
        for row in (2, 0, 1):
            writer.add({"row": row})
        with pytest.raises(RuntimeError, match="row 1 was produced twice"):
            writer.add({"row": 1})
        with pytest.raises(RuntimeError, match="1 of 4 rows have no output"):
            writer.check_complete(4)
    assert [json.loads(line)["row"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == [0, 1, 2]


# ---- two Ray replicas ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # The replicas import this checkout's nanovllm, whatever is installed.
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray
    ray.shutdown()


def run_two_replicas(tiny_model: str, path: pathlib.Path, output: pathlib.Path, on_batch_done, **options: object) -> BatchSummary:
    return run_batch(
        tiny_model, str(path), str(output), replicas=2, batch_size=10, cpus_per_replica=1.0, batch_timeout_s=120,
        on_batch_done=on_batch_done, use_tqdm=False, **options, **ENGINE,
    )


class KillBoth:
    """on_batch_done hook: kills the first replica to finish a batch, then the other one when it finishes
    one. The runner has already handed each its next batch, so each dies holding one (or the one after,
    if its batch came back before the kill landed)."""

    def __init__(self, ray) -> None:
        self.ray = ray
        self.killed: list[str] = []
        self.after_kills: list[str] = []

    def __call__(self, done: BatchDone) -> None:
        if len(self.killed) == 2:
            self.after_kills.append(done.replica)
        elif done.replica not in self.killed:
            self.killed.append(done.replica)
            self.ray.kill(self.ray.get_actor(done.replica))


@pytest.fixture(scope="module")
def two_replica_run(ray_cluster, tiny_model: str, batch_input, tmp_path_factory: pytest.TempPathFactory):
    output = tmp_path_factory.mktemp("ray") / "out.jsonl"
    batches: list[BatchDone] = []
    summary = run_two_replicas(tiny_model, batch_input[0], output, batches.append)
    return output, summary, batches


def test_two_replicas_equal_one_generate_row_for_row(two_replica_run, batch_input) -> None:
    output, summary, _ = two_replica_run
    _, expected, bad = batch_input
    check_output(output, expected, bad)
    assert (summary.num_rows, summary.num_errors, summary.rerun_batches, summary.dead_replicas) == (len(expected) + len(bad), len(bad), 0, [])


def test_two_replicas_share_the_rows_and_run_at_once(two_replica_run) -> None:
    _, summary, batches = two_replica_run
    rows: dict[str, int] = {}
    for done in batches:
        rows[done.replica] = rows.get(done.replica, 0) + len(done.records)
    assert len(rows) == 2 and min(rows.values()) >= summary.num_rows // 4, rows
    spans = {name: [(done.started, done.finished) for done in batches if done.replica == name] for name in rows}
    first, second = spans.values()
    overlap = sum(max(0.0, min(a_end, b_end) - max(a_start, b_start)) for a_start, a_end in first for b_start, b_end in second)
    busy = min(sum(end - start for start, end in first), sum(end - start for start, end in second))
    assert overlap >= 0.5 * busy, (overlap, busy)


def test_killed_replicas_are_replaced_their_batches_rerun_and_every_row_written_once(ray_cluster, tiny_model: str, batch_input, tmp_path: pathlib.Path) -> None:
    path, expected, bad = batch_input
    kill = KillBoth(ray_cluster)
    start = time.monotonic()
    summary = run_two_replicas(tiny_model, path, tmp_path / "out.jsonl", kill)
    check_output(tmp_path / "out.jsonl", expected, bad)
    assert summary.dead_replicas == kill.killed and summary.rerun_batches == 2
    # With both originals dead, the rest ran on their replacements (a killed one may have returned one more).
    assert set(kill.after_kills) - set(kill.killed), kill.after_kills
    assert all(kill.after_kills.count(name) <= 1 for name in kill.killed)
    assert time.monotonic() - start < 120


def test_without_restarts_losing_every_replica_fails_the_run_and_writes_nothing(ray_cluster, tiny_model: str, batch_input, tmp_path: pathlib.Path) -> None:
    kill = KillBoth(ray_cluster)
    with pytest.raises(RuntimeError, match="all replicas died .* no restarts are left"):
        run_two_replicas(tiny_model, batch_input[0], tmp_path / "out.jsonl", kill, max_restarts=0)
    assert len(kill.killed) == 2 and os.listdir(tmp_path) == []


@pytest.mark.cuda
@pytest.mark.parametrize("tp", [1, 2])
def test_two_gpu_replicas_equal_one_generate(tiny_model: str, vocab_ids: int, batch_input, tmp_path: pathlib.Path, tp: int) -> None:
    """Two replicas, each an engine on its own `tp` GPUs (one placement-group bundle), equal one generate."""
    import torch

    if torch.cuda.device_count() < 2 * tp:
        pytest.skip(f"needs {2 * tp} GPUs")
    ray = pytest.importorskip("ray")
    path, _, bad = batch_input
    expected = reference(tiny_model, good_rows(200, vocab_ids), device="cuda")
    ray.init(num_cpus=4, num_gpus=2 * tp, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        summary = run_batch(tiny_model, str(path), str(tmp_path / "out.jsonl"), replicas=2, batch_size=16, batch_timeout_s=300,
                            use_tqdm=False, **{**ENGINE, "device": "cuda", "tensor_parallel_size": tp})
    finally:
        ray.shutdown()
    check_output(tmp_path / "out.jsonl", expected, bad)
    assert summary.dead_replicas == []
