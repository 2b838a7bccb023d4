"""`fedtextseg simulate` stops the local SuperLink that `flwr run` leaves behind, and only the one of its own
FLWR_HOME, whatever the width of `ps` output (the FLWR_HOME path comes late in a SuperLink's long command line)."""

import subprocess
import sys
import time

from fedtextseg.simulate import stop_local_superlink


def _fake_superlink(home) -> subprocess.Popen:
    # a process whose command line looks like the one `flwr run` starts: long, with the home path near the end
    args = ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess", "--control-api-address",
            "127.0.0.1:39093", "--host", "127.0.0.1", "--port", "39091", "--log-file",
            f"{home}/local-superlink/superlink.log", "--database", f"{home}/local-superlink/state.db"]
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *args])


def test_stops_its_own_superlink_even_when_ps_would_cut_lines(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # `ps` would cut every line to 80 characters
    mine, other = tmp_path / ("a" * 120) / "flwr", tmp_path / "other" / "flwr"
    ours, theirs = _fake_superlink(mine), _fake_superlink(other)
    try:
        time.sleep(0.5)
        assert stop_local_superlink(mine) == [ours.pid]
        assert ours.wait(timeout=15) is not None
        assert theirs.poll() is None  # another FLWR_HOME's SuperLink is left alone
    finally:
        for p in (ours, theirs):
            p.kill()
            p.wait()
