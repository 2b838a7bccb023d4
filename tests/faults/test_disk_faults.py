"""A full disk or an unwritable results folder: a clear error before training starts, and a disk that fills up
mid-run ends the run with a clear error, the last checkpoint intact, and a clean resume once space is freed.

Where the test runs as root and may mount, the disk is a real tmpfs of a few MB (filled with a filler file; made
read-only with ``remount,ro``), so the errors are the kernel's own ENOSPC/EROFS. Elsewhere (CI without root) the
same tests simulate the condition at the OS-call level: ``shutil.disk_usage`` reports almost no free space, and
the numpy array write inside the checkpoint raises ``OSError(ENOSPC)`` (``FEDTEXTSEG_TEST_NO_MOUNT=1`` forces this).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import numpy as np
import pytest

from faults.helpers import QUIET, honest_updates, hospitals, tiny_cfg, trained  # noqa: F401 - fixture
from fedtextseg import engine
from fedtextseg.errors import ConfigError, FedTextSegError
from fedtextseg.federation.checkpoint import list_checkpoints, load_latest
from fedtextseg.federation.coordinator import Coordinator
from fedtextseg.federation.inprocess import run_federation_inprocess


def _mount(path, *options) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount") or os.environ.get("FEDTEXTSEG_TEST_NO_MOUNT"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def disk(tmp_path):
    """(folder, real): a 48 MB tmpfs when it can be mounted (real=True), else a plain folder."""
    folder = tmp_path / "disk"
    folder.mkdir()
    real = _mount(folder, "size=48m")
    yield folder, real
    if real:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder, leave: int = 0) -> None:
    """Fill the file system of ``folder`` until ``leave`` bytes are free (or it refuses more)."""
    with open(folder / "filler.bin", "wb") as fh:
        chunk = b"\0" * (1 << 20)
        try:
            while (free := shutil.disk_usage(folder).free) > leave:
                fh.write(chunk[: max(1, min(len(chunk), free - leave))])
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def no_training(monkeypatch):
    def train_steps(*_a, **_k):
        raise AssertionError("training started despite a results folder that cannot hold the run")

    monkeypatch.setattr(engine, "train_steps", train_steps)


def test_full_disk_is_refused_before_training(hospitals, disk, monkeypatch):
    folder, real = disk
    if real:
        fill(folder, leave=256 << 10)
    else:
        monkeypatch.setattr("fedtextseg.preflight.shutil.disk_usage",
                            lambda p: shutil._ntuple_diskusage(1 << 30, (1 << 30) - (256 << 10), 256 << 10))
    no_training(monkeypatch)
    cfg = tiny_cfg(hospitals, 2, f"run.results_dir={folder}")
    with pytest.raises(ConfigError, match=r"has 0\.\d MB free but .*needs about .*run\.results_dir") as err:
        run_federation_inprocess(cfg, folder / "run", **QUIET)
    assert str(folder / "run") in str(err.value)


@pytest.mark.parametrize("how", ["file-in-the-way", "read-only"])
def test_unwritable_results_folder_is_refused_before_training(hospitals, tmp_path, monkeypatch, how):
    no_training(monkeypatch)
    if how == "file-in-the-way":
        (tmp_path / "results").write_text("not a folder")
        run_dir = tmp_path / "results" / "run"
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        if not _mount(folder, "size=1m", "ro"):
            pytest.skip("needs root to mount a read-only file system (root ignores file permissions)")
        run_dir = folder / "run"
    try:
        with pytest.raises(ConfigError, match="is not writable .* before training starts") as err:
            run_federation_inprocess(tiny_cfg(hospitals, 1), run_dir, **QUIET)
        assert str(run_dir) in str(err.value)
    finally:
        if how == "read-only":
            subprocess.run(["umount", "-l", str(tmp_path / "ro")], capture_output=True)


def test_disk_filling_up_mid_run_keeps_the_last_checkpoint_and_resumes(hospitals, disk, monkeypatch):
    folder, real = disk
    cfg = tiny_cfg(hospitals, 3)
    coord = Coordinator(cfg, folder / "run", **QUIET)
    coord.finish_train_round(1, honest_updates(coord), {})
    coord.checkpoint(1)
    if real:  # another process fills the disk
        fill(folder)
    else:
        def enospc(*_a, **_k):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(np.lib.format, "write_array", enospc)
    with pytest.raises(FedTextSegError, match="No space left on device") as err:
        coord.finish_train_round(2, honest_updates(coord, seed=2), {})
        coord.checkpoint(2)
    assert str(folder / "run") in str(err.value) and "resume" in str(err.value)
    assert [r for r, _ in list_checkpoints(folder / "run")] == [1]
    assert not [p for p in (folder / "run" / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert load_latest(folder / "run").round == 1

    (folder / "filler.bin").unlink(missing_ok=True)  # space freed
    monkeypatch.undo()
    resumed = Coordinator(cfg, folder / "run", resume=True, **QUIET)
    assert resumed.start_round == 2
    resumed.finish_train_round(2, honest_updates(resumed, seed=2), {})
    resumed.checkpoint(2)
    assert trained(folder / "run") == {(r, s): 1 for r in (1, 2) for s in "abc"}
