"""Tests of the deployment scripts (scripts/deploy), end to end with a real SuperLink and SuperNodes on 127.0.0.1.

``make_certs.sh`` makes a test CA, the SuperLink's TLS certificate and three SuperNode key pairs;
``start_superlink.sh`` starts the SuperLink with TLS and SuperNode authentication; ``configure_cli.py`` points a
private ``flwr`` CLI at it; ``register_supernodes.sh`` registers two of the keys. Two SuperNodes
(``start_supernode.sh``), each on its own synthetic site folder with its own Flower home and cache, join; a third
whose key was never registered must be refused. Then one round of the real app runs with ``flwr run <project>
<connection> --stream`` on tiny settings, and its ``metrics.jsonl`` must have a train row from each site. The
server is given an empty data root and no site list, as in a real deployment where the images stay at the sites.

Every process is started in its own process group and stopped with all its descendants (SIGTERM, then SIGKILL)
by the fixture. Free ports only (bound to port 0), nothing outside 127.0.0.1. That test is slow (about 1.5-3.5
minutes on 2 busy cores: every Flower message starts a fresh ClientApp process): ``-m slow``. The fast tests
check the scripts' pieces on their own: certificates and keys, the CLI connection file, argument checks, and the
ClientApp's on-disk local state.
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
        """SIGTERM every started process and all its descendants (Flower starts its SuperExec, ServerApp and
        ClientApp processes in sessions of their own, so killing the process group is not enough), then SIGKILL
        whatever is left after 15 s."""
        found = set()
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                found.add(proc.pid)
            found |= _descendants(proc.pid)
        pids = {pid: _start_time(pid) for pid in found}  # (pid, start time): never signal a recycled pid
        live = lambda: [pid for pid, started in pids.items() if started and _start_time(pid) == started]
        for pid in live():
            _signal(pid, signal.SIGTERM)
        deadline = time.time() + 15
        while time.time() < deadline and live():
            time.sleep(0.5)
        for pid in live():
            _signal(pid, signal.SIGKILL)
        for proc, _ in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _descendants(pid: int) -> set[int]:
    """All live descendants of ``pid`` (from ``ps``)."""
    try:
        out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    children: dict[int, list[int]] = {}
    for line in out.split("\n"):
        parts = line.split()
        if len(parts) == 2:
            children.setdefault(int(parts[1]), []).append(int(parts[0]))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _start_time(pid: int) -> str | None:
    """The process's start time (identifies it together with the pid); None if it is gone or a zombie."""
    try:
        out = subprocess.run(["ps", "-o", "stat=,lstart=", "-p", str(pid)], capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out or out.startswith("Z"):
        return None
    return out.split(None, 1)[1] if " " in out else out


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


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


def _need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: the deployment scripts need it")


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.replace(".py", ""), DEPLOY / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- fast tests
def test_make_certs_layout_and_rerun(tmp_path):
    _need("bash", "openssl")
    out = tmp_path / "certs"
    first = _run(["bash", str(DEPLOY / "make_certs.sh"), str(out), "--server-name", "fl.example.org",
                  "--server-ip", "10.1.2.3", "a", "b"], os.environ.copy(), tmp_path)
    assert first.returncode == 0, first.stderr
    assert _run(["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / "server.crt")], os.environ.copy(),
                tmp_path).returncode == 0
    san = _run(["openssl", "x509", "-in", str(out / "server.crt"), "-noout", "-ext", "subjectAltName"],
               os.environ.copy(), tmp_path).stdout
    for name in ("localhost", "127.0.0.1", "fl.example.org", "10.1.2.3"):
        assert name in san, san
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    for site in ("a", "b"):
        key = load_ssh_private_key((out / "supernodes" / site / "auth_key").read_bytes(), None)
        pub = load_ssh_public_key((out / "supernodes" / site / "auth_key.pub").read_bytes())
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert pub.public_numbers() == key.public_key().public_numbers()
        assert (out / "supernodes" / site / "auth_key").stat().st_mode & 0o077 == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = _run(["bash", str(DEPLOY / "make_certs.sh"), str(out), "a", "c"], os.environ.copy(), tmp_path)
    assert again.returncode == 0, again.stderr
    assert all(p.read_bytes() == data for p, data in before.items() if p.name != "ca.srl")  # nothing replaced
    assert (out / "supernodes" / "c" / "auth_key.pub").is_file()
    bad = _run(["bash", str(DEPLOY / "make_certs.sh"), str(out), "no/slash"], os.environ.copy(), tmp_path)
    assert bad.returncode != 0 and "bad site name" in bad.stderr


def test_configure_cli_keeps_other_connections(tmp_path):
    cli = _load_script("configure_cli.py")
    config, ca = tmp_path / "config.toml", tmp_path / "ca.crt"
    ca.write_text("x")
    config.write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
                      '[superlink.local.options]\nnum-supernodes = 2\n\n[superlink.fed]\naddress = "old:1"\n')
    cli.write_connection(config, "fed", "fl.example.org:9092", ca)
    cli.write_connection(config, "fed", "fl.example.org:9093", ca)
    import tomllib

    parsed = tomllib.loads(config.read_text())
    assert parsed["superlink"]["default"] == "local"
    assert parsed["superlink"]["local"] == {"address": ":local:", "options": {"num-supernodes": 2}}
    assert parsed["superlink"]["fed"] == {"address": "fl.example.org:9093", "root-certificates": str(ca)}
    cli.write_connection(config, "fed", "fl.example.org:9093", ca, make_default=True)
    assert tomllib.loads(config.read_text())["superlink"]["default"] == "fed"
    fresh = tmp_path / "new" / "config.toml"
    cli.write_connection(fresh, "fed", "h:1", ca)
    assert tomllib.loads(fresh.read_text())["superlink"]["default"] == "fed"


def test_start_scripts_refuse_missing_inputs(tmp_path):
    _need("bash")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("FEDTEXTSEG_SUPERLINK", None)
    link = _run(["bash", str(DEPLOY / "start_superlink.sh"), str(tmp_path)], env, tmp_path)
    assert link.returncode == 2 and "ca.crt is missing" in link.stderr
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "auth_key").write_text("x")
    node = _run(["bash", str(DEPLOY / "start_supernode.sh"), "a", str(tmp_path / "nope"), "--certs",
                 str(tmp_path)], env, tmp_path)
    assert node.returncode == 2 and "no SuperLink address" in node.stderr
    node = _run(["bash", str(DEPLOY / "start_supernode.sh"), "a", str(tmp_path / "nope"), "--certs",
                 str(tmp_path), "--superlink", "127.0.0.1:1"], env, tmp_path)
    assert node.returncode == 2 and "does not exist" in node.stderr
    node = _run(["bash", str(DEPLOY / "start_supernode.sh"), "a", str(tmp_path), "--certs", str(tmp_path),
                 "--superlink", "127.0.0.1:1"], env, tmp_path)
    assert node.returncode == 2 and "neither site.yaml nor dataset.json" in node.stderr


def test_client_local_state_survives_a_fresh_process(tmp_path, monkeypatch):
    """Deployment runs each message in a new ClientApp process: ``local`` arrays are kept on disk, per run name."""
    import types

    import torch

    from fedtextseg.federation.site_state import load_local_state, local_state_file, save_local_state
    from fedtextseg.params import build_param_groups

    monkeypatch.setenv("FEDTEXTSEG_CACHE", str(tmp_path))

    def runner():
        model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1), torch.nn.InstanceNorm3d(2, affine=True))
        model.param_groups = lambda: build_param_groups(model, frozen_common=lambda n: False, per_class={},
                                                        local=lambda n: n.startswith("1."), shared=lambda n: True)
        merge = lambda arrays: model.load_state_dict({k: torch.as_tensor(v) for k, v in arrays.items()},
                                                     strict=False)
        return types.SimpleNamespace(model=model, site=types.SimpleNamespace(name="site a"), load_global=merge)

    ctx = types.SimpleNamespace(run_id=2**64 - 5, run_config={"run-name": "study/1"})
    trained = runner()
    with torch.no_grad():
        trained.model[1].weight.fill_(3.0)
    save_local_state(trained, ctx.run_config["run-name"], ctx.run_id)
    assert local_state_file(trained, ctx.run_config["run-name"]).parent.parent == tmp_path / "site-state"

    fresh = runner()  # the next message's process: same run
    load_local_state(fresh, ctx.run_config["run-name"], ctx.run_id)
    assert torch.equal(fresh.model[1].weight, torch.full((2,), 3.0))
    other = types.SimpleNamespace(run_id=7, run_config={"run-name": "study/1"})  # a new run reusing the name
    fresh = runner()
    load_local_state(fresh, other.run_config["run-name"], other.run_id)
    assert torch.equal(fresh.model[1].weight, torch.ones(2))
    other.run_config["resume"] = True  # ... resuming it continues the local state
    load_local_state(fresh, other.run_config["run-name"], other.run_id, resume=other.run_config["resume"])
    assert torch.equal(fresh.model[1].weight, torch.full((2,), 3.0))


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture
def processes(tmp_path):
    procs = _Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.mark.slow
def test_superlink_tls_supernode_auth_one_round(tmp_path, processes):
    _need("openssl", "bash")
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

    from fedtextseg.synthetic.ct import generate_hospitals

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
    limit = 420.0  # the run took 2.5-3 minutes on 2 cores at load ~8; generous, so a loaded machine does not fail
    try:
        run = _run(["flwr", "run", str(ROOT), CONNECTION, "--stream", "--run-config", run_config], cli_env, ROOT,
                   timeout=limit)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`flwr run` did not finish in {limit:.0f}s\n{exc.stdout}\n{processes.tails()}")
    run_dir = results / "deploy-test"
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{processes.tails()}"
    assert (run_dir / "summary.txt").is_file(), f"{run.stdout}\n{run.stderr}\n{processes.tails()}"
    assert "no site list on the server" in run.stdout + run.stderr  # so it waited for min_sites SuperNodes
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
