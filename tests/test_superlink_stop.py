"""`fedtextseg simulate` gives each run's local SuperLink free ports of its own and stops only the SuperLink of its
own FLWR_HOME and port, whatever the width of `ps` output (the FLWR_HOME path comes late in a SuperLink's long
command line)."""

import subprocess
import sys
import time

from fedtextseg.simulate import stop_local_superlink


def _fake_superlink(home, port: int = 39091) -> subprocess.Popen:
    # a process whose command line looks like the one `flwr run` starts: long, with the home path near the end
    args = ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess", "--control-api-address",
            "127.0.0.1:39093", "--host", "127.0.0.1", "--port", str(port), "--log-file",
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


def test_a_run_gets_free_ports_of_its_own_and_fixed_ports_in_use_are_refused(tmp_path):
    import socket

    import pytest

    from fedtextseg.errors import ConfigError
    from fedtextseg.simulate import PORT_ENV, local_superlink_ports

    first, second = local_superlink_ports({}), local_superlink_ports({})
    assert len(set(first)) == 2 and all(1024 < p < 65536 for p in first + second)
    with socket.socket() as held:  # a SuperLink of another run listens on the port this run was told to use
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "flower-superlink", "--port",
                                  str(port), "--log-file", f"{tmp_path}/other/local-superlink/superlink.log"])
        try:
            time.sleep(0.5)
            with pytest.raises(ConfigError, match=f"port {port} .*process {other.pid}.*unset {PORT_ENV[0]}"):
                local_superlink_ports({PORT_ENV[0]: str(port)})
        finally:
            other.kill()
            other.wait()
    assert local_superlink_ports({PORT_ENV[0]: str(port), PORT_ENV[1]: str(second[1])}) == (port, second[1])


def test_stopping_by_port_leaves_another_run_of_the_same_home_alone(tmp_path):
    home = tmp_path / "flwr"
    ours, theirs = _fake_superlink(home, port=41001), _fake_superlink(home, port=41002)
    try:
        time.sleep(0.5)
        assert stop_local_superlink(home, port=41001) == [ours.pid]
        assert ours.wait(timeout=15) is not None and theirs.poll() is None
    finally:
        for p in (ours, theirs):
            p.kill()
            p.wait()
