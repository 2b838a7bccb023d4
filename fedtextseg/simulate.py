"""``fedtextseg simulate``: the one-command Flower simulation (what ``make demo`` runs).

It composes the experiment's config, generates the synthetic hospitals if absent, makes sure
``$FLWR_HOME/config.toml`` has the local simulation SuperLink (so a new user never edits it), runs
``flwr run <project> local --stream`` with one simulated SuperNode per site, and stops the background SuperLink
that ``flwr run`` leaves behind. The Flower command it runs is printed first, so researchers can run it by hand.

Runs side by side: each run's local SuperLink listens on two free ports of its own (Flower reads them from
``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` / ``FLWR_LOCAL_CONTROL_API_PORT``), so a second run never joins the first
one's SuperLink; the ports and the SuperLink's process id go to the log and to ``<run>/superlink.json``, and the
clean-up ends only the SuperLink on this run's port. Ports the user fixed in those variables are refused in one line
naming the process that holds them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from fedtextseg.config import compose_config, configs_dir, list_experiments
from fedtextseg.errors import ConfigError
from fedtextseg.sites import data_root, ensure_data

__all__ = ["simulate_main", "ensure_flower_config", "flower_home", "stop_local_superlink", "flwr_run_command",
           "local_superlink_ports", "PORT_ENV"]

LOCAL_FEDERATION = '[superlink.local]\naddress = ":local:"\n'
# where `flwr run` puts the local SuperLink it starts for `address = ":local:"` (Flower's defaults: 39091, 39093)
PORT_ENV = ("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT")


def flower_home() -> Path:
    return Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")).expanduser()


def ensure_flower_config(home: Path | None = None) -> Path:
    """Add the local simulation SuperLink to ``$FLWR_HOME/config.toml`` if it is not there (keeps other entries)."""
    home = home or flower_home()
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    text = path.read_text() if path.exists() else ""
    if "[superlink.local]" not in text:
        if "[superlink]" not in text:
            text = '[superlink]\ndefault = "local"\n\n' + text
        text = text.rstrip() + ("\n\n" if text.strip() else "") + LOCAL_FEDERATION
        path.write_text(text)
    return path


def _free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that nothing listens on now (the OS picks them)."""
    sockets = []
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _superlinks(port: int | None = None, home: Path | None = None) -> list[tuple[int, str]]:
    """(pid, command line) of the flower-superlink processes on ``port`` and/or of ``home`` (None: any)."""
    home_text = str(home.resolve()) if home is not None else None
    found = []
    for pid_text, args in _processes():
        words = args.split()
        if not words or not any(w.endswith("flower-superlink") for w in words):
            continue
        if port is not None and f"--port {port} " not in f"{args} ":
            continue
        if home_text is not None and home_text not in args:
            continue
        try:
            found.append((int(pid_text), args))
        except ValueError:
            continue
    return found


def local_superlink_ports(env: dict | None = None) -> tuple[int, int]:
    """(HTTP API port, control API port) for this run's local SuperLink.

    The ports the user fixed in :data:`PORT_ENV` are kept unless something listens there already (then a
    ConfigError names the SuperLink process and its FLWR_HOME, or says the port is taken); otherwise two free ports.
    """
    env = os.environ if env is None else env
    fixed = env.get(PORT_ENV[0])
    if not fixed:
        http, control = _free_ports(2)
        return http, control
    try:
        http = int(fixed)
        control = int(env.get(PORT_ENV[1]) or _free_ports(1)[0])
    except ValueError:
        raise ConfigError(f"{PORT_ENV[0]}/{PORT_ENV[1]} must be port numbers, got {fixed!r}, "
                          f"{env.get(PORT_ENV[1])!r}") from None
    for name, port in zip(PORT_ENV, (http, control)):
        if _port_taken(port):
            holders = _superlinks(port=http)
            who = (f"the SuperLink of process {holders[0][0]} ({holders[0][1][:200]})" if holders
                   else "another program")
            raise ConfigError(f"port {port} ({name}) is taken by {who}: another run is using it; unset "
                              f"{PORT_ENV[0]} and {PORT_ENV[1]} to give this run free ports of its own")
    return http, control


def stop_local_superlink(home: Path | None = None, port: int | None = None) -> list[int]:
    """Stop the SuperLink that ``flwr run`` started for this ``FLWR_HOME`` (and, given ``port``, on that port only:
    another run's SuperLink under the same FLWR_HOME is left alone); returns the process ids it stopped."""
    stopped = []
    for pid, _ in _superlinks(port=port, home=home or flower_home()):
        try:
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.time() + 10.0
    for pid in stopped:  # a busy SuperLink may ignore SIGTERM for a while: end it for sure
        while time.time() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return stopped


def _processes() -> list[tuple[str, str]]:
    """(pid, full command line) of every process. Whole command lines matter: the FLWR_HOME path comes late in the
    SuperLink's arguments, and ``ps`` cuts lines to ``$COLUMNS`` when that is set (as it is inside some tools)."""
    proc = Path("/proc")
    if proc.is_dir():
        out = []
        for entry in proc.iterdir():
            if entry.name.isdigit():
                try:
                    out.append((entry.name, (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")))
                except OSError:  # ended meanwhile, or not ours to read
                    continue
        return out
    try:
        text = subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [tuple(line.strip().partition(" ")[::2]) for line in text.splitlines()]  # type: ignore[misc]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as ended
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def flwr_run_command(project: Path, num_sites: int, run_config: dict, cpus_per_site: int = 1) -> list[str]:
    """``flwr run`` of this project on the local SuperLink, ``num_sites`` simulated SuperNodes of ``cpus_per_site``
    whole CPUs each (Flower 1.41's simulation config holds an unsigned integer there)."""
    def toml(v):
        return f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)

    rc = " ".join(f"{k}={toml(v)}" for k, v in run_config.items())
    return [_flwr_executable(), "run", str(project), "local", "--stream",
            "--federation-config", f"num-supernodes={num_sites} client-resources-num-cpus={_whole_cpus(cpus_per_site)}",
            "--run-config", rc]


def threads_per_site(overrides: str, cpus_per_site: int) -> str:
    """``overrides`` with ``run.threads`` set to the CPUs Ray reserves per simulated site, unless they set it.

    An experiment's own ``run.threads`` (the demo's is 1: sites side by side on the cores) would otherwise leave
    a site that was given 2 CPUs training on 1 of them, and Ray's OMP_NUM_THREADS is the reservation anyway."""
    if any(part.lstrip("+~").split("=", 1)[0] == "run.threads" for part in shlex.split(overrides)):
        return overrides
    return f"{overrides} run.threads={cpus_per_site}".strip()


def _whole_cpus(value) -> int:
    """A count of whole CPUs >= 1, else a ConfigError that says why (Flower reserves whole CPUs per SuperNode)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number >= 1 or number != int(number):
        raise ConfigError(f"--cpus-per-site must be a whole number of CPUs >= 1, got {value!r}: Flower 1.41's "
                          "simulation reserves whole CPUs per simulated SuperNode (to run more sites at once than "
                          "there are cores, keep 1 and set run.threads=1)")
    return int(number)


def _flwr_executable() -> str:
    """Flower's CLI from this interpreter's environment (a virtualenv need not be on PATH), else from PATH."""
    import shutil

    beside = Path(sys.executable).parent / "flwr"
    found = str(beside) if beside.is_file() else shutil.which("flwr")
    if found is None:
        raise ConfigError("Flower's `flwr` command is not installed in this environment (pip install 'flwr[simulation]')")
    return found


def simulate_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedtextseg simulate", description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="demo", help=f"experiment config ({', '.join(list_experiments())})")
    p.add_argument("--overrides", default="", help='Hydra overrides, e.g. "federation.rounds=5 model=cdpdnet_small"')
    p.add_argument("--run-name", default=None, help="results/<run-name> (default: <experiment>-<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue --run-name from its last checkpoint")
    p.add_argument("--cpus-per-site", default="1",
                   help="whole Ray CPUs reserved per simulated SuperNode, and its torch threads unless "
                        "--overrides sets run.threads (default 1)")
    args = p.parse_args(argv)
    if args.resume and not args.run_name:
        raise ConfigError("--resume needs --run-name (the run to continue)")
    cpus_per_site = _whole_cpus(args.cpus_per_site)  # before any data is generated or a SuperLink started

    overrides = threads_per_site(args.overrides, cpus_per_site)
    cfg = compose_config(args.experiment, overrides)
    sites = ensure_data(cfg)
    project = configs_dir().parent
    run_name = args.run_name or f"{args.experiment}-{datetime.now():%Y%m%d-%H%M%S}"
    run_config = {"experiment": args.experiment, "overrides": overrides, "run-name": run_name,
                  "data-root": str(data_root(cfg)),
                  "results-dir": str(Path(cfg.run.results_dir).expanduser().resolve()), "resume": args.resume}
    ensure_flower_config()
    http_port, control_port = local_superlink_ports()
    cmd = flwr_run_command(project, len(sites), run_config, cpus_per_site)
    print("fedtextseg simulate:", " ".join(shlex.quote(c) for c in cmd), flush=True)
    print(f"fedtextseg simulate: this run's local SuperLink: 127.0.0.1:{http_port} (control API {control_port}), "
          f"FLWR_HOME {flower_home()}", flush=True)
    env = dict(os.environ)
    env[PORT_ENV[0]], env[PORT_ENV[1]] = str(http_port), str(control_port)
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    # `flwr run` launches flower-superlink by name: this environment's scripts must be on PATH (a virtualenv
    # used as `.venv/bin/fedtextseg` is not activated)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a Ray FutureWarning on CPU-only runs
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=project, env=env)
    finally:
        stopped = stop_local_superlink(port=http_port)
    run_dir = Path(run_config["results-dir"]) / run_name
    if run_dir.is_dir():
        (run_dir / "superlink.json").write_text(json.dumps(
            {"http_api_port": http_port, "control_api_port": control_port, "flwr_home": str(flower_home()),
             "stopped_pids": stopped}, indent=2) + "\n")
    summary = run_dir / "summary.txt"
    print(f"\nfedtextseg simulate: {len(sites)} sites, {time.perf_counter() - start:.0f} s wall time", flush=True)
    if proc.returncode != 0 or not summary.is_file():
        print(f"fedtextseg simulate: the Flower run failed (exit {proc.returncode}); see the log above and "
              f"{flower_home() / 'local-superlink' / 'superlink.log'}", file=sys.stderr)
        return proc.returncode or 1
    print(summary.read_text())
    print(f"results: {run_dir}")
    return 0
