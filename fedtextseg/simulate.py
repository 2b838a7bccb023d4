"""``fedtextseg simulate``: the one-command Flower simulation (what ``make demo`` runs).

It composes the experiment's config, generates the synthetic hospitals if absent, makes sure
``$FLWR_HOME/config.toml`` has the local simulation SuperLink (so a new user never edits it), runs
``flwr run <project> local --stream`` with one simulated SuperNode per site, and stops the background SuperLink
that ``flwr run`` leaves behind. The Flower command it runs is printed first, so researchers can run it by hand.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from fedtextseg.config import compose_config, configs_dir, list_experiments
from fedtextseg.errors import ConfigError
from fedtextseg.sites import data_root, ensure_data

__all__ = ["simulate_main", "ensure_flower_config", "flower_home", "stop_local_superlink", "flwr_run_command"]

LOCAL_FEDERATION = '[superlink.local]\naddress = ":local:"\n'


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


def stop_local_superlink(home: Path | None = None) -> list[int]:
    """Stop the SuperLink (and its SuperExec) that ``flwr run`` started for this ``FLWR_HOME``."""
    home = str((home or flower_home()).resolve())
    stopped = []
    for pid_text, args in _processes():
        if "flower-superlink" in args and home in args:
            try:
                os.kill(int(pid_text), signal.SIGTERM)
                stopped.append(int(pid_text))
            except (ProcessLookupError, ValueError, PermissionError):
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


def flwr_run_command(project: Path, num_sites: int, run_config: dict, cpus_per_site: float = 1.0) -> list[str]:
    def toml(v):
        return f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)

    rc = " ".join(f"{k}={toml(v)}" for k, v in run_config.items())
    return [_flwr_executable(), "run", str(project), "local", "--stream",
            "--federation-config", f"num-supernodes={num_sites} client-resources-num-cpus={cpus_per_site:g}",
            "--run-config", rc]


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
    p.add_argument("--cpus-per-site", type=float, default=1.0, help="Ray CPUs reserved per simulated SuperNode")
    args = p.parse_args(argv)
    if args.resume and not args.run_name:
        raise ConfigError("--resume needs --run-name (the run to continue)")

    cfg = compose_config(args.experiment, args.overrides)
    sites = ensure_data(cfg)
    project = configs_dir().parent
    run_name = args.run_name or f"{args.experiment}-{datetime.now():%Y%m%d-%H%M%S}"
    run_config = {"experiment": args.experiment, "overrides": args.overrides, "run-name": run_name,
                  "data-root": str(data_root(cfg)),
                  "results-dir": str(Path(cfg.run.results_dir).expanduser().resolve()), "resume": args.resume}
    ensure_flower_config()
    cmd = flwr_run_command(project, len(sites), run_config, args.cpus_per_site)
    print("fedtextseg simulate:", " ".join(shlex.quote(c) for c in cmd), flush=True)
    env = dict(os.environ)
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
        stop_local_superlink()
    run_dir = Path(run_config["results-dir"]) / run_name
    summary = run_dir / "summary.txt"
    print(f"\nfedtextseg simulate: {len(sites)} sites, {time.perf_counter() - start:.0f} s wall time", flush=True)
    if proc.returncode != 0 or not summary.is_file():
        print(f"fedtextseg simulate: the Flower run failed (exit {proc.returncode}); see the log above and "
              f"{flower_home() / 'local-superlink' / 'superlink.log'}", file=sys.stderr)
        return proc.returncode or 1
    print(summary.read_text())
    print(f"results: {run_dir}")
    return 0
