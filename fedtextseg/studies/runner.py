"""Run a study: every arm x seed through the project's own training entry points, then its table and plots.

    fedtextseg study main                         # CPU-sized default (configs/study/main.yaml, size "cpu")
    fedtextseg study privacy --config paper       # the GPU-sized budget
    fedtextseg study main --seeds 1 --rounds 1 --local-steps 2 --arms fedtextseg,naive   # a smoke run
    fedtextseg study main --report-only           # redo table + plots from the runs already on disk
    fedtextseg study main --jobs 1                # one run at a time (default: one per core on a CPU)

Arm kinds: ``federated`` (:func:`fedtextseg.federation.inprocess.run_federation_inprocess`: the Coordinator and
SiteRunner rounds of the Flower apps, in one process), ``centralized``
(:func:`fedtextseg.centralized.train_centralized`: pooled data, the same number of gradient steps) and ``local``
(:func:`fedtextseg.baselines.train_local_only`). A naive-softmax arm gets the federation's union of classes as its
label space (:func:`fedtextseg.baselines.with_federation_label_space`).

Writes ``<out>/<study>/``: ``table.md``, ``table.csv`` (one row per arm), ``per_class.csv``, ``runs.csv`` (one row
per arm x seed), ``*.png``, ``study.json`` (date, machine, command, budget, seeds), ``configs/<arm>-seed<k>.yaml``
(each run's resolved config) and ``runs/<arm>/seed<k>/`` (each run's own record plus ``result.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from fedtextseg.errors import ConfigError, FedTextSegError
from fedtextseg.studies.collect import summarise_run
from fedtextseg.studies.spec import ArmSpec, StudySpec, arm_overrides, list_studies, load_study

__all__ = ["run_study", "run_arm_seed", "export_figures", "resolve_jobs", "machine_info", "PeakMemory", "study_main"]


def machine_info() -> dict[str, Any]:
    """Where the numbers come from: CPU model, cores, torch and its device (stamped on tables and the page)."""
    import torch

    from fedtextseg.tracking import cpu_model, environment_info

    info = environment_info()
    info.update(cpu_model=cpu_model(), torch_threads=torch.get_num_threads(),
                device=f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu",
                load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
    return info


class PeakMemory:
    """Peak memory of one run inside a long process: CUDA's peak allocation on a GPU, else the process's peak
    resident set, reset at the start through ``/proc/self/clear_refs`` (Linux); where that reset is impossible the
    figure is the process's lifetime peak and ``exact`` is False."""

    def __init__(self) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        self.exact = True
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.exact = False

    def peak_mb(self) -> float:
        import torch

        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _select_sites(cfg, count: int) -> None:
    """Restrict ``cfg`` to the first ``count`` sites of its data root (generated with at least that many)."""
    from fedtextseg.sites import data_root, ensure_data

    available = ensure_data(cfg, log_fn=lambda *_: None)
    if len(available) < count:
        raise ConfigError(f"the arm wants {count} sites but {data_root(cfg)} has {len(available)}; raise "
                          f"data.generate.sites in the study's size (and delete the folder to regenerate it)")
    cfg.data.sites = [str(p.relative_to(data_root(cfg))) for p in available[:count]]


def run_arm_seed(spec: StudySpec, arm: ArmSpec, size: str, seed: int, out: Path, extra: Sequence[str] = (),
                 log_fn=print) -> dict[str, Any]:
    """Train and evaluate one arm with one seed; return its record (also written to ``result.json``)."""
    from fedtextseg.baselines import train_local_only, with_federation_label_space
    from fedtextseg.centralized import train_centralized
    from fedtextseg.config import compose_config, save_resolved
    from fedtextseg.federation.inprocess import run_federation_inprocess

    run_dir = out / "runs" / arm.name / f"seed{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh record (and privacy ledger) every time
    cfg = compose_config(spec.experiment_for(size), arm_overrides(spec, arm, size, seed, run_dir, extra))
    if arm.sites:
        _select_sites(cfg, arm.sites)
    cfg = with_federation_label_space(cfg)
    if cfg.run.threads:
        import torch

        torch.set_num_threads(int(cfg.run.threads))
    save_resolved(cfg, out / "configs" / f"{arm.name}-seed{seed}.yaml")
    memory = PeakMemory()
    start = time.perf_counter()
    if arm.kind == "federated":
        run_federation_inprocess(cfg, run_dir, log_fn=log_fn)
    elif arm.kind == "centralized":
        train_centralized(cfg, run_dir, log_fn=log_fn)
    else:
        train_local_only(cfg, run_dir, log_fn=log_fn)
    from fedtextseg.sites import federation_sites

    measured = {"arm": arm.name, "label": arm.title, "kind": arm.kind, "seed": int(seed), "x": arm.x,
                "rounds": int(cfg.federation.rounds), "local_steps": int(cfg.train.local_steps),
                "sites": len(federation_sites(cfg)), "wall_s": time.perf_counter() - start,
                "peak_mb": memory.peak_mb(), "peak_mb_exact": memory.exact}
    record = summarise_run(run_dir, arm.kind, measured=measured)
    (run_dir / "result.json").write_text(json.dumps(record, indent=2, default=_json_default))
    log_fn(f"[{spec.name}/{arm.name} seed {seed}] sites' mean Dice {record['site_mean']:.3f}, unseen mean Dice "
           f"{record['unseen_mean']:.3f}, {record['wall_s']:.0f} s, peak {record['peak_mb']:.0f} MB")
    return record


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _load_records(out: Path, arms: Sequence[ArmSpec], seeds: Sequence[int]) -> list[dict[str, Any]]:
    records = []
    for arm in arms:
        for seed in seeds:
            path = out / "runs" / arm.name / f"seed{seed}" / "result.json"
            if path.is_file():
                records.append(json.loads(path.read_text()))
    return records


def run_study(name: str, *, size: str = "cpu", seeds: int | None = None, out: str | Path = "results/studies",
              arms: Sequence[str] | None = None, extra: Sequence[str] = (), reuse: bool = False,
              report_only: bool = False, command: str | None = None, jobs: int | str = 1,
              log_fn=print) -> Path:
    """Run (or, ``report_only``, only re-report) a study; returns its output folder.

    ``jobs`` > 1 (or ``"auto"``: :func:`resolve_jobs`) trains that many arm x seed runs at once, each in its own
    process with ``cores // jobs`` torch threads; the data every arm needs is generated once beforehand."""
    from fedtextseg.studies.report import write_study_outputs

    spec = load_study(name)
    budget = spec.size(size)
    n_seeds = int(seeds if seeds is not None else budget.get("seeds", 1))
    if n_seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {n_seeds}")
    seed_list = list(range(n_seeds))
    chosen = [spec.arm(a) for a in (arms or budget.get("arms") or [a.name for a in spec.arms])]
    folder = Path(out).expanduser().resolve() / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    jobs_used, threads_per_job = 0, None
    if not report_only:
        todo = []
        for arm in chosen:
            for seed in seed_list:
                done = folder / "runs" / arm.name / f"seed{seed}" / "result.json"
                if reuse and done.is_file():
                    log_fn(f"[{spec.name}/{arm.name} seed {seed}] reusing {done}")
                    continue
                todo.append((arm, seed))
        jobs_used = min(resolve_jobs(jobs), len(todo)) if todo else 0
        if jobs_used > 1:
            threads_per_job = _run_in_processes(name, spec, todo, size, folder, extra, jobs_used, log_fn)
        else:
            for arm, seed in todo:
                run_arm_seed(spec, arm, size, seed, folder, extra, log_fn=log_fn)
    records = _load_records(folder, chosen, seed_list)
    if not records:
        raise ConfigError(f"no finished runs of study {spec.name!r} under {folder / 'runs'}")
    info = {"study": spec.name, "title": spec.title, "size": size, "seeds": seed_list,
            "arms": [a.name for a in chosen], "extra_overrides": list(extra), "budget": budget,
            "command": command or f"fedtextseg study {spec.name} --config {size}",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_info(),
            "elapsed_s": None if report_only else time.perf_counter() - start,
            "parallel_jobs": jobs_used or None}
    if threads_per_job is not None:  # the runs' own torch threads, not this parent process's
        info["machine"]["torch_threads"] = threads_per_job
    previous = folder / "study.json"
    if report_only and previous.is_file():  # a rebuilt report keeps when, where and how its runs were made
        ran = json.loads(previous.read_text())
        info.update({k: ran[k] for k in ("date", "machine", "command", "elapsed_s", "parallel_jobs") if k in ran})
    (folder / "study.json").write_text(json.dumps(info, indent=2, default=_json_default))
    write_study_outputs(spec, chosen, records, info, folder)
    log_fn(f"study {spec.name}: wrote {folder / 'table.md'} ({len(records)} runs)")
    if spec.export and not extra:  # a smoke run (extra overrides) never replaces the published figures
        log_fn(f"study {spec.name}: wrote {export_figures(spec, chosen, records, info)}")
    return folder


def export_figures(spec: StudySpec, arms: Sequence[ArmSpec], records: Sequence[dict], info: dict) -> Path:
    """The study's headline numbers as ``{arm: {"dice_per_image", "dice_pooled", ...}}`` in ``spec.export`` (from
    the project root): the unseen hospital's per-image mean and pooled Dice, mean over seeds with their std. Arms
    not run this time keep their earlier entry."""
    from fedtextseg.config import configs_dir
    from fedtextseg.studies.collect import group_by_arm

    path = Path(spec.export)
    path = path if path.is_absolute() else configs_dir().parent / path
    figures = json.loads(path.read_text()) if path.is_file() else {}
    for arm, agg in group_by_arm(arms, records):
        (dice, dice_std, n), (pooled, pooled_std, _) = (agg["scalars"]["unseen_mean"],
                                                         agg["scalars"]["unseen_pooled_mean"])
        entry = {"dice_per_image": dice, "dice_pooled": pooled, "dice_per_image_std": dice_std,
                 "dice_pooled_std": pooled_std, "seeds": n, "kind": arm.kind, "label": arm.title,
                 "size": info["size"], "date": info["date"], "cpu": info["machine"].get("cpu_model"),
                 "device": info["machine"].get("device"), "wall_s": agg["scalars"]["wall_s"][0]}
        figures[arm.name] = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in entry.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2, default=_json_default) + "\n")
    return path


def resolve_jobs(jobs: int | str) -> int:
    """How many runs to train at once: ``"auto"`` is one per CPU core on a CPU-only machine (small 3D networks
    use one core better than two threads of one run) and one on a GPU machine (the runs would share one GPU)."""
    if str(jobs) == "auto":
        import torch

        return 1 if torch.cuda.is_available() else max(1, os.cpu_count() or 1)
    if int(jobs) < 1:
        raise ConfigError(f"--jobs must be at least 1 or 'auto', got {jobs!r}")
    return int(jobs)


def _prepare_data(spec: StudySpec, arms: Sequence[ArmSpec], size: str, out: Path, extra: Sequence[str],
                  log_fn) -> None:
    """Generate every data root the arms use, once, before parallel runs start (two processes generating the
    same synthetic hospitals at once would collide)."""
    from fedtextseg.config import compose_config
    from fedtextseg.sites import data_root, ensure_data

    seen = set()
    for arm in arms:
        cfg = compose_config(spec.experiment_for(size), arm_overrides(spec, arm, size, 0, out / "prepare", extra))
        if data_root(cfg) not in seen:
            seen.add(data_root(cfg))
            ensure_data(cfg, log_fn=log_fn)


def _run_in_process(study: str, arm_name: str, size: str, seed: int, out: str, extra: list[str],
                    threads: int) -> str:
    """One arm x seed in a worker process (spawned: a fresh interpreter, its own torch threads)."""
    import torch

    torch.set_num_threads(threads)
    spec = load_study(study)
    run_arm_seed(spec, spec.arm(arm_name), size, seed, Path(out), extra,
                 log_fn=lambda *parts: print(*parts, flush=True) if str(parts[0]).startswith(f"[{spec.name}/")
                 else None)
    return f"{arm_name} seed {seed}"


def _run_in_processes(study: str, spec: StudySpec, todo: Sequence[tuple[ArmSpec, int]], size: str, out: Path,
                      extra: Sequence[str], jobs: int, log_fn) -> int:
    """Train ``todo`` with ``jobs`` worker processes; every run that can finish does, then failures are raised.
    Returns the torch threads each run had."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    _prepare_data(spec, [arm for arm, _ in todo], size, out, extra, log_fn)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    log_fn(f"study {spec.name}: {len(todo)} runs, {jobs} at a time, {threads} torch thread(s) each")
    failed = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run_in_process, study, arm.name, size, seed, str(out), list(extra), threads):
                   (arm.name, seed) for arm, seed in todo}
        for future in as_completed(futures):
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - the other runs go on; every failure is reported at the end
                failed.append(f"{futures[future][0]} seed {futures[future][1]}: {type(exc).__name__}: {exc}")
                log_fn(f"[{spec.name}/{futures[future][0]} seed {futures[future][1]}] failed: {exc}")
    if failed:
        raise FedTextSegError(f"study {spec.name}: {len(failed)} of {len(todo)} runs failed: " + "; ".join(failed))
    return threads


def study_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedtextseg study", description=__doc__.split("\n\n")[0])
    p.add_argument("study", help=f"study name ({', '.join(list_studies())}) or a study YAML file")
    p.add_argument("--config", default="cpu", help="budget from the study file: cpu (2 cores) or paper (GPU)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the size's)")
    p.add_argument("--out", default="results/studies", help="parent folder of <study>/")
    p.add_argument("--arms", default=None, help="comma list of arms to run (default: the size's arms, else all)")
    p.add_argument("--rounds", type=int, default=None, help="override federation.rounds (smoke runs)")
    p.add_argument("--local-steps", type=int, default=None, help="override train.local_steps (smoke runs)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--jobs", default="auto",
                   help="runs trained at once, each its own process (default auto: one per core on a CPU, 1 on a GPU)")
    p.add_argument("--reuse", action="store_true", help="keep finished runs (result.json) instead of rerunning")
    p.add_argument("--report-only", action="store_true", help="only rebuild table and plots from finished runs")
    p.add_argument("--quiet", action="store_true", help="only one line per finished run")
    p.add_argument("override", nargs="*", help="extra Hydra overrides for every run, e.g. train.lr=2e-3")
    args = p.parse_intermixed_args(argv)  # overrides may follow the options: study qata --arms a x.y=1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    extra = list(args.override)
    if args.rounds is not None:
        extra.append(f"federation.rounds={args.rounds}")
    if args.local_steps is not None:
        extra.append(f"train.local_steps={args.local_steps}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
    quiet, prefix = args.quiet, f"[{Path(args.study).stem}/"

    def log_fn(*parts):
        text = " ".join(str(x) for x in parts)
        if not quiet or text.startswith(prefix):
            print(text, flush=True)

    folder = run_study(args.study, size=args.config, seeds=args.seeds, out=args.out, arms=arms, extra=extra,
                       reuse=args.reuse, report_only=args.report_only, jobs=args.jobs,
                       command=" ".join(["fedtextseg study", *(argv if argv is not None else sys.argv[1:])]),
                       log_fn=log_fn)
    print((folder / "table.md").read_text())
    return 0
