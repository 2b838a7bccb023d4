"""End-to-end test of the deployment scripts (scripts/deploy): a real SuperLink and SuperNodes on 127.0.0.1.

``make_certs.sh`` makes a test CA, the SuperLink's TLS certificate and three SuperNode key pairs;
``start_superlink.sh`` starts the SuperLink with TLS and SuperNode authentication; ``configure_cli.py`` points a
private ``flwr`` CLI at it; ``register_supernodes.sh`` registers two of the keys. Two SuperNodes
(``start_supernode.sh``), each on its own synthetic site folder with its own Flower home and cache, join; a third
whose key was never registered must be refused. Then one round of the real app runs with ``flwr run <project>
<connection> --stream`` on tiny settings, and its ``metrics.jsonl`` must have a train row from each site. The
server is given an empty data root and no site list, as in a real deployment where the images stay at the sites.

Every process is started in its own process group and stopped (SIGTERM, then SIGKILL) by the fixture. Free
ports only (bound to port 0), nothing outside 127.0.0.1. Slow (about 2-3 minutes on 2 cores): ``-m slow``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "scripts" / "deploy"
BIN = Path(sys.executable).parent
CONNECTION = "fedtest"
SITES = {"site-a": "site01-btcv", "site-b": "site02-lits"}  # SuperNode name -> synthetic site folder
OVERRIDES = ("federation.rounds=1 train.local_steps=2 eval.max_cases=1 eval.hd95=false "
             "federation.evaluate_unseen=false federation.min_sites=2 data.generate=null data.unseen=null")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Processes:
    """Background processes of one test, each in its own session (process group), with its output in a file."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}

    def start(self, name: str, cmd: list[str], env: dict, cwd: Path) -> subprocess.Popen:
        log = self.log_dir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = (proc, log)
        return proc

    def log(self, name: str) -> str:
        return self.procs[name][1].read_text(errors="replace")

    def tails(self, lines: int = 25) -> str:
        return "\n".join(f"---- {name} ----\n" + "\n".join(self.log(name).splitlines()[-lines:])
                         for name in self.procs)

    def stop_all(self) -> None:
        for proc, _ in reversed(list(self.procs.values())):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 15
        for proc, _ in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            try:  # the whole group: SuperExec and ClientApp/ServerApp children too
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait(timeout=5)


def _wait(predicate, timeout: float, what: str, procs: _Processes, interval: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{procs.tails()}")


def _run(cmd: list[str], env: dict, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def processes(tmp_path):
    procs = _Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


def test_superlink_tls_supernode_auth_one_round(tmp_path, processes):
    for tool in ("openssl", "bash"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: make_certs.sh needs it")
    for tool in ("flower-superlink", "flower-supernode", "flwr"):
        if not (BIN / tool).exists():
            pytest.skip(f"{tool} is not installed next to {sys.executable}")
    start = time.time()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_TMPDIR": str(tmp_path / "ray"),
           "PYTHONUNBUFFERED": "1"}
    env.pop("FLWR_HOME", None)

    # ---------------------------------------------------------------- certificates, keys, site data
    certs = tmp_path / "certs"
    made = _run(["bash", str(DEPLOY / "make_certs.sh"), str(certs), "--server-name", "superlink.test",
                 *SITES, "intruder"], env, tmp_path)
    assert made.returncode == 0, made.stdout + made.stderr
    for f in ("ca.crt", "server.crt", "server.key", *(f"supernodes/{s}/auth_key.pub" for s in [*SITES, "intruder"])):
        assert (certs / f).is_file(), f
    san = _run(["openssl", "x509", "-in", str(certs / "server.crt"), "-noout", "-ext", "subjectAltName"],
               env, tmp_path).stdout
    assert "127.0.0.1" in san and "localhost" in san and "superlink.test" in san, san

    from fedtextseg.data.synthetic import generate_hospitals

    data = tmp_path / "data"
    generate_hospitals(data, sites=2, cases_per_site=2, seed=0, shape=(32, 32, 32), unseen=False)
    server_data = tmp_path / "server-data"  # the server holds no site data in a deployment
    server_data.mkdir()

    # ---------------------------------------------------------------- SuperLink (TLS + SuperNode auth)
    port = _free_port()
    link = processes.start(
        "superlink", ["bash", str(DEPLOY / "start_superlink.sh"), str(certs), "--host", "127.0.0.1", "--port",
                      str(port), "--state-dir", str(tmp_path / "link-state")],
        {**env, "FLWR_HOME": str(tmp_path / "home-link"), "FEDTEXTSEG_CACHE": str(tmp_path / "cache-server")},
        tmp_path)
    cli_env = {**env, "FLWR_HOME": str(tmp_path / "home-cli")}
    conf = _run([sys.executable, str(DEPLOY / "configure_cli.py"), CONNECTION, f"127.0.0.1:{port}", "--ca",
                 str(certs / "ca.crt")], cli_env, tmp_path)
    assert conf.returncode == 0, conf.stderr

    def nodes() -> list[dict] | None:
        out = _run(["flwr", "supernode", "ls", CONNECTION, "--format", "json"], cli_env, tmp_path)
        try:
            reply = json.loads(out.stdout[out.stdout.index("{"):])
        except ValueError:
            return None
        return reply.get("nodes") if reply.get("success") else None

    def up(name: str, text: str):
        proc = processes.procs[name][0]
        assert proc.poll() is None, f"{name} exited (code {proc.returncode})\n{processes.tails()}"
        return text in processes.log(name)

    _wait(lambda: up("superlink", f"running on https://127.0.0.1:{port}"), 90, "the SuperLink", processes)

    def supernode(name: str, folder: str) -> None:
        processes.start(
            f"supernode-{name}",
            ["bash", str(DEPLOY / "start_supernode.sh"), name, str(data / folder), "--superlink",
             f"127.0.0.1:{port}", "--certs", str(certs), "--port", str(_free_port()),
             "--cache-dir", str(tmp_path / f"cache-{name}"), "--", "--max-retries", "3"],
            {**env, "FLWR_HOME": str(tmp_path / f"home-{name}")}, tmp_path)

    supernode("intruder", "site01-btcv")  # its key is never registered
    reg = _run(["bash", str(DEPLOY / "register_supernodes.sh"), CONNECTION, str(certs), *SITES], cli_env, tmp_path)
    assert reg.returncode == 0, reg.stdout + reg.stderr
    assert reg.stdout.count("registered as node") == 2, reg.stdout

    # ---------------------------------------------------------------- SuperNodes: the two registered ones join
    for name, folder in SITES.items():
        supernode(name, folder)
    for name in SITES:
        _wait(lambda: up(f"supernode-{name}", "SuperNode ID:"), 90, f"SuperNode {name} to be accepted", processes)
    listed = nodes()
    assert listed is not None and sorted(n.get("status") for n in listed) == ["online", "online"], listed

    intruder = processes.procs["supernode-intruder"][0]
    _wait(lambda: intruder.poll() is not None, 60, "the unregistered SuperNode to be refused", processes)
    assert intruder.returncode != 0
    assert "Failed to activate SuperNode" in processes.log("supernode-intruder"), processes.log("supernode-intruder")
    assert "SuperNode ID:" not in processes.log("supernode-intruder")
    assert "No SuperNode found with the given public key" in processes.log("superlink")

    # ---------------------------------------------------------------- one round of the real app
    results = tmp_path / "results"
    run_config = (f'experiment="demo" overrides="{OVERRIDES}" data-root="{server_data}" '
                  f'results-dir="{results}" run-name="deploy-test"')
    remaining = 420.0  # about 1.5-2.5 minutes on 2 busy cores: generous, so a loaded machine does not fail it
    try:
        run = _run(["flwr", "run", str(ROOT), CONNECTION, "--stream", "--run-config", run_config], cli_env, ROOT,
                   timeout=remaining)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`flwr run` did not finish in {remaining:.0f}s\n{exc.stdout}\n{processes.tails()}")
    run_dir = results / "deploy-test"
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{processes.tails()}"
    assert (run_dir / "summary.txt").is_file(), f"{run.stdout}\n{run.stderr}\n{processes.tails()}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    trained = {r["site"] for r in rows if r.get("kind") == "train"}
    assert trained == set(SITES.values()), rows
    rounds = [r for r in rows if r.get("kind") == "round"]
    assert rounds and rounds[0]["sites"] == 2 and rounds[0]["aggregated"], rounds
    assert not [r for r in rows if r.get("kind") == "failure"], rows
    # each site got the frozen parts once and cached them in its own cache folder
    for name in SITES:
        assert list((tmp_path / f"cache-{name}" / "frozen").glob("*.frozen")), name
    assert not (tmp_path / "cache-intruder" / "frozen").exists()
    print(f"deployment test: {time.time() - start:.0f} s")
