"""The federation server as a separate process, for ``test_server_kill.py`` to kill with SIGKILL at a chosen moment.

``python server_child.py HOSPITALS RUN_DIR MODE [--resume]`` runs the in-process federation (real Coordinator,
real sites, real checkpoints) of ``faults.helpers.tiny_cfg`` for 3 rounds, and, to be killed at a known point,
writes ``RUN_DIR/../MODE.ready`` and sleeps there:

- ``MODE=checkpoint-write``: while writing the round-2 checkpoint, with half of its bytes in the temp file and half
  a metrics row appended to metrics.jsonl (what a kill in the middle of those writes leaves behind);
- ``MODE=after-train``: in round 3 after the round's training rows are recorded, before its checkpoint.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]  # tests/: conftest, test_federation_inprocess, faults

from faults.helpers import QUIET, tiny_cfg  # noqa: E402
from fedtextseg.federation import checkpoint as ckpt_module  # noqa: E402
from fedtextseg.federation.coordinator import Coordinator  # noqa: E402
from fedtextseg.federation.inprocess import run_federation_inprocess  # noqa: E402

SITE_OVERRIDES = ("data.sites=[site01-btcv,site02-lits]", "federation.evaluate_unseen=false", "federation.min_sites=2")


def config(hospitals: str):
    return tiny_cfg(Path(hospitals), 3, *SITE_OVERRIDES)


def _wait_to_be_killed(run_dir: Path, mode: str) -> None:
    (run_dir.parent / f"{mode}.ready").touch()
    time.sleep(600)
    raise SystemExit("not killed")


def main(hospitals: str, run_dir: str, mode: str, resume: bool) -> None:
    run_dir = Path(run_dir)
    if mode == "checkpoint-write":
        real_write = ckpt_module.write_archive

        def write_archive(path, manifest, arrays):
            if manifest.get("round") != 2:
                return real_write(path, manifest, arrays)
            scratch = run_dir.parent / "scratch.ckpt"
            real_write(scratch, manifest, arrays)
            data = scratch.read_bytes()
            with open(Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}"), "wb") as fh:
                fh.write(data[: len(data) // 2])
            with open(run_dir / "metrics.jsonl", "a") as fh:
                fh.write('{"time": 1.0, "round": 2, "kind": "tra')
            os.remove(scratch)
            _wait_to_be_killed(run_dir, mode)

        ckpt_module.write_archive = write_archive
    elif mode == "after-train":
        real_checkpoint = Coordinator.checkpoint

        def checkpoint(self, round_):
            if round_ == 3:
                _wait_to_be_killed(run_dir, mode)
            return real_checkpoint(self, round_)

        Coordinator.checkpoint = checkpoint
    run_federation_inprocess(config(hospitals), run_dir, resume=resume, **QUIET)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], "--resume" in sys.argv[4:])
