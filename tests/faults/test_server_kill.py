"""The server process killed with SIGKILL mid-run, twice, then resumed: no round lost or counted twice, and the
final global model is bit-for-bit the one an uninterrupted run with the same seed ends with.

Kill 1 lands in the middle of writing the round-2 checkpoint (half the archive in its temp file, half a row in
metrics.jsonl): the latest checkpoint is still round 1 and valid. Kill 2 lands in round 3 after its training rows
were recorded but before its checkpoint: the resume must drop those rows and redo round 3. The server is
``server_child.py`` (the in-process federation: real Coordinator, sites and checkpoints) in its own process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from faults.helpers import QUIET, hospitals, trained  # noqa: F401 - fixture
from faults.server_child import config
from fedtextseg.federation.checkpoint import list_checkpoints, load_latest
from fedtextseg.federation.inprocess import run_federation_inprocess
from fedtextseg.tracking import read_metrics

pytestmark = pytest.mark.slow
CHILD = Path(__file__).with_name("server_child.py")
SITES = ("site01-btcv", "site02-lits")


def run_and_kill(hospitals: Path, run_dir: Path, mode: str, resume: bool) -> None:
    log = run_dir.parent / f"{mode}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(CHILD), str(hospitals), str(run_dir), mode]
                                + (["--resume"] if resume else []), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    ready, deadline = run_dir.parent / f"{mode}.ready", time.time() + 300
    try:
        while not ready.exists():
            assert proc.poll() is None, f"server exited early ({proc.returncode}):\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, "server never reached the kill point"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_sigkilled_server_resumes_without_losing_or_doubling_a_round(hospitals, tmp_path):
    run = tmp_path / "run"
    run_and_kill(hospitals, run, "checkpoint-write", resume=False)
    assert [r for r, _ in list_checkpoints(run)] == [1]
    (temp,) = (run / "checkpoints").glob(".round-000002.ckpt.tmp-*")  # the half-written file, never under its name
    latest = load_latest(run)
    assert latest.round == 1 and latest.skipped == []
    assert not (run / "metrics.jsonl").read_text().endswith("\n")  # the cut-short row

    run_and_kill(hospitals, run, "after-train", resume=True)
    assert [r for r, _ in list_checkpoints(run)] == [1, 2] and not temp.exists()  # stale temp file cleared
    assert {s for r, s in trained(run) if r == 3} == set(SITES)  # round 3 was recorded, not checkpointed

    resumed = run_federation_inprocess(config(hospitals), run, resume=True, **QUIET)
    assert resumed.start_round == 3
    assert trained(run) == {(r, s): 1 for r in (1, 2, 3) for s in SITES}
    assert [r["round"] for r in read_metrics(run) if r["kind"] == "round"] == [1, 2, 3]
    full = run_federation_inprocess(config(hospitals), tmp_path / "uninterrupted", **QUIET)
    for k, v in full.global_arrays.items():
        np.testing.assert_array_equal(resumed.global_arrays[k], v, err_msg=k)
    assert (run / "model.pt").is_file() and (run / "summary.txt").is_file()
