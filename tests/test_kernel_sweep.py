"""benchmarks/kernel_sweep.py: its CPU smoke run through Triton's interpreter, and that a config whose
output is wrong or whose launch raises is reported as such (never dropped, never timed)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from serving import REPO

sys.path.insert(0, str(REPO))
from benchmarks import kernel_sweep  # noqa: E402
from benchmarks.kernel_cases import Case, Dims, VarlenConfig  # noqa: E402


def test_smoke_run_checks_every_config_and_prints_the_summary() -> None:
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "benchmarks/kernel_sweep.py", "--smoke"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    sweep, summary = done.stdout.split("# summary")
    rows = [line for line in sweep.splitlines() if line.startswith(("decode ", "varlen "))]
    summary = summary.splitlines()[1:]
    assert len(summary) == 4 and all("0 failed" in line and "| best " in line for line in summary), done.stdout
    assert sum("<- default" in row for row in rows) == 4
    assert len(rows) >= 16 and all("| err " in row for row in rows), done.stdout


@pytest.fixture
def case() -> Case:
    case = Case("varlen", "chunk", [5, 3], [5, 9])
    case.build(Dims(4, 2, 16, 4, 16, torch.float32), torch.device("cpu"), 1, seed=0)
    case.default = VarlenConfig(16, 16, 4, 1, None)
    return case


def _run(case: Case, launch, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> str:
    monkeypatch.setattr(Case, "launch", launch)
    kernel_sweep.run_config(case, case.default, case.reference(), torch.device("cpu"), {})
    return capsys.readouterr().out


def test_a_config_that_leaves_the_output_unwritten_fails(case, monkeypatch, capsys) -> None:
    out = _run(case, lambda self, cfg, layer: None, monkeypatch, capsys)
    assert "FAIL wrong output" in out and "<- default" in out
    assert case.results[case.default].status.startswith("FAIL")


def test_a_config_that_raises_is_an_error_row(case, monkeypatch, capsys) -> None:
    def launch(self, cfg, layer):
        raise RuntimeError("out of resource: shared memory")

    out = _run(case, launch, monkeypatch, capsys)
    assert "ERROR RuntimeError: out of resource: shared memory" in out


def test_a_correct_output_is_timed(case, monkeypatch, capsys) -> None:
    ref = case.reference()
    out = _run(case, lambda self, cfg, layer: self.out.copy_(ref), monkeypatch, capsys)
    result = case.results[case.default]
    assert result.status == "ok" and result.err == 0 and result.us > 0, out
