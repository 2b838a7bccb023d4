"""QaTa-COV19 study: report-guided TGC-Net federated vs image-only federated vs centralized (vs full fine-tuning).

    python simulations/qata_study.py                      # CPU-sized (experiment tgcnet_qata), ~30-40 min, 2 cores
    python simulations/qata_study.py --config paper       # paper-sized (tgcnet_qata_paper): GPU
    python simulations/qata_study.py --quick              # a smoke run: 2 rounds of 4 steps, 60 valid images
    python simulations/qata_study.py --arms fed-text,fed-image --rounds 4 --local-steps 20 --out results/studies/q

Every arm trains on the 3 non-IID hospitals cut from QaTa-COV19 ``train/`` (``configs/data/qata.yaml``) through the
project's own machinery: federated arms run the ``Coordinator`` + ``SiteRunner`` rounds of
``fedtextseg.federation.inprocess`` (what the Flower apps run, in one process: no Ray on 2 cores), the centralized arm
runs ``fedtextseg.centralized.train_centralized`` on the pooled sites with the same number of gradient steps. Each
arm's final ``model.pt`` is reloaded with ``load_model_file`` and evaluated on QaTa ``valid/`` (300 images, never
trained on), reporting both Dice definitions:

* **per-image mean Dice**: Dice of each image, averaged over images (LViT/U-Net style numbers);
* **pooled Dice**: 2|P and G| / (|P| + |G|) with pixels summed over the whole split (the TGC-Net paper's number).

Both are computed at the model's input resolution (masks resized nearest-neighbour), so CPU-sized numbers (96 px,
random-init CLIP) are NOT comparable to published 224 px results. Also reported: trainable parameters, bytes per
round per site (each way) of what the federation sends vs full-model FedAvg, and the frozen bundle sent once.
Writes ``qata_results.md``, ``qata_results.csv`` and ``qata_dice.png`` (if matplotlib is installed) under ``--out``.
Exits 0 with a message when the QaTa-COV19 folder is absent (``FEDTEXTSEG_QATA`` or ``../shared/data/qata-cov19``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

ARMS = {  # name -> (mode, model kwargs overrides, description)
    "fed-text": ("federated", {}, "TGC-Net, reports + glossary, LoRA on CLIP towers (federated)"),
    "fed-image": ("federated", {"text_mode": "none"}, "image-only ablation: no text tower / calibration attention"),
    "central-text": ("centralized", {}, "TGC-Net, reports, LoRA, trained on the pooled sites (upper reference)"),
    "fed-text-full": ("federated", {"finetune": "full"}, "TGC-Net, reports, full fine-tuning of the CLIP towers"),
}
DEFAULT_ARMS = "fed-text,fed-image,central-text"
EXPERIMENTS = {"cpu": "tgcnet_qata", "paper": "tgcnet_qata_paper"}


def qata_source() -> Path:
    """Where the dataset is: ``$FEDTEXTSEG_QATA`` or ``../shared/data/qata-cov19`` from the project root."""
    env = os.environ.get("FEDTEXTSEG_QATA")
    return Path(env).expanduser() if env else (PROJECT.parent / "shared" / "data" / "qata-cov19").resolve()


def _overrides(args, out: Path, arm: str) -> str:
    """Hydra overrides shared by every arm, plus the arm's model kwargs."""
    parts = [f"data.root={out / 'data'}", f"data.generate.source={qata_source()}", f"run.results_dir={out / 'runs'}",
             f"run.seed={args.seed}", "eval.max_cases=8", "federation.evaluate_unseen=false"]
    if args.rounds:
        parts.append(f"federation.rounds={args.rounds}")
    if args.local_steps:
        parts.append(f"train.local_steps={args.local_steps}")
    if args.image_size:
        parts.append(f"++model.kwargs.image_size={args.image_size}")
    for k, v in ARMS[arm][1].items():
        parts.append(f"++model.kwargs.{k}={v}")
    if ARMS[arm][0] == "centralized":
        parts.append("data.unseen=null")  # valid/ is evaluated once, below, like every other arm
    return " ".join(parts + list(args.override))


def evaluate_on_valid(cfg, model_path: Path, limit: int | None) -> dict:
    """Reload ``model.pt`` (no hub, no encoder) and evaluate it on every (or ``limit``) image of QaTa valid/."""
    from fedtextseg.model_file import load_model_file
    from fedtextseg.runtime import SiteRunner

    model, _ = load_model_file(model_path)
    runner = SiteRunner(cfg, Path(cfg.data.root).resolve() / "qata-valid", model)
    ds = runner.all_cases_dataset()
    n = len(ds) if limit is None else min(len(ds), limit)
    start, cpu_start = time.perf_counter(), time.process_time()
    summary = runner.evaluate(ds, max_cases=n)["lung infection"]
    return {"dice_per_image": summary["dice"], "dice_pooled": summary["dice_pooled"], "valid_images": n,
            "eval_seconds": time.perf_counter() - start, "eval_cpu_seconds": time.process_time() - cpu_start}


def run_arm(arm: str, args, out: Path) -> dict:
    """Train one arm, evaluate its final model on valid/, and describe its size and traffic."""
    import torch

    from fedtextseg.centralized import train_centralized
    from fedtextseg.config import compose_config
    from fedtextseg.federation.inprocess import run_federation_inprocess
    from fedtextseg.runtime import build_model, prepare_bank

    mode = ARMS[arm][0]
    cfg = compose_config(EXPERIMENTS[args.config], _overrides(args, out, arm))
    run_dir = out / "runs" / arm
    start, cpu_start = time.perf_counter(), time.process_time()
    quiet = (lambda *_: None) if args.quiet else print
    if mode == "federated":
        coord = run_federation_inprocess(cfg, run_dir, log_fn=quiet)
        model = coord.model
        wire = int(sum(a.nbytes for a in coord.global_arrays.values()))
        frozen = int(coord.frozen.nbytes)
    else:
        train_centralized(cfg, run_dir, log_fn=quiet)
        model = build_model(cfg, prepare_bank(cfg, log_fn=quiet))
        wire = frozen = 0
    train_seconds, train_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    full = int(sum(t.numel() * t.element_size() for t in model.state_dict().values()))
    counts = model.parameter_counts()
    row = {"arm": arm, "mode": mode, "model": str(cfg.model.name), "description": ARMS[arm][2],
           "text": model.config.text_mode,
           "finetune": model.config.finetune, "trainable_params": counts["trainable"], "total_params": counts["total"],
           "clip_trainable": counts["clip_trainable"], "rounds": int(cfg.federation.rounds),
           "local_steps": int(cfg.train.local_steps), "batch_size": int(cfg.train.batch_size),
           "image_size": int(model.config.image_size),
           "wire_mb_per_site_round": wire / 1e6 if mode == "federated" else None,
           "frozen_mb_once_per_site": frozen / 1e6 if mode == "federated" else None,
           "full_fedavg_mb_per_site_round": full / 1e6, "train_seconds": train_seconds,
           "train_cpu_seconds": train_cpu}
    row.update(evaluate_on_valid(cfg, run_dir / "model.pt", args.valid_limit))
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    print(f"[{arm}] per-image mean Dice {row['dice_per_image']:.4f}, pooled Dice {row['dice_pooled']:.4f} on "
          f"{row['valid_images']} valid images; {row['trainable_params']:,} trainable params; "
          f"train {train_seconds:.0f}s, eval {row['eval_seconds']:.0f}s", flush=True)
    return row


def read_rows(path: Path) -> list[dict]:
    """Rows of an earlier ``qata_results.csv`` with numbers as numbers and empty cells as None."""
    def parse(v: str):
        if v == "":
            return None
        for cast in (int, float):
            try:
                return cast(v)
            except ValueError:
                pass
        return v

    with path.open(newline="") as fh:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _fmt(v, digits=4) -> str:
    """A table cell: thousands separators for ints, fixed digits for floats, '-' for missing values."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def write_outputs(rows: list[dict], args, out: Path, total_seconds: float) -> None:
    """The CSV (every field), the Markdown report (settings, table, notes) and, if matplotlib is present, a plot."""
    import platform

    import torch

    fields = list(dict.fromkeys(k for r in rows for k in r))  # every key, first-seen order
    with (out / "qata_results.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    r0 = rows[0]
    model_name = next((r["model"] for r in rows if r.get("model")), "?")
    head = ("| arm | mode | text | CLIP fine-tuning | trainable params | per-image mean Dice | pooled Dice | "
            "MB/site/round (each way) | full-model FedAvg MB/site/round | frozen MB (once/site) "
            "| train s (wall / CPU) |")
    lines = [
        f"# QaTa-COV19 study ({args.config} setting)", "",
        f"Settings: experiment `{EXPERIMENTS[args.config]}`, model `{model_name}` at "
        f"{r0['image_size']}x{r0['image_size']} px, {r0['rounds']} rounds x {r0['local_steps']} local steps x batch "
        f"{r0['batch_size']} per site (centralized: the same number of steps on the pooled data), 3 hospitals cut "
        f"from QaTa `train/` non-IID by infection extent, seed {args.seed}. Evaluated on "
        f"{r0['valid_images']} images of QaTa `valid/` (never trained on). Device: "
        f"{'cuda ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'} ({os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads), {platform.python_version()}, torch {torch.__version__}. "
        f"Wall time of this invocation: {total_seconds / 60:.1f} min (CPU time is the process's, all threads: "
        f"on a shared machine wall time also counts other people's jobs).", "",
        "Dice definitions: **per-image mean** = Dice of each valid image, averaged over images; **pooled** = Dice of "
        "all valid pixels together (the TGC-Net paper's 90.5 is pooled; LViT's 83.7 per-image). Both at the model's "
        "input resolution.", "", head, "|" + "---|" * (head.count("|") - 1),
    ]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[k]) if k not in ("dice_per_image", "dice_pooled") else f"{r[k]:.4f}"
                                        for k in ("arm", "mode", "text", "finetune", "trainable_params",
                                                  "dice_per_image", "dice_pooled", "wire_mb_per_site_round",
                                                  "full_fedavg_mb_per_site_round", "frozen_mb_once_per_site")) +
                     f" | {r['train_seconds']:.0f} / {r['train_cpu_seconds']:.0f} |")
    lines += ["", "Arms:"] + [f"- `{r['arm']}`: {r['description']}" for r in rows]
    lines += ["", "Notes:",
              "- CPU setting: the CLIP towers of `tgcnet_small` are random-init (no pretrained CLIP of that shape "
              "exists offline); the `paper` setting uses CLIP ViT-B/16 weights where they are available. Numbers "
              "at 96 px from a few rounds are a plumbing-level comparison, not a reproduction of published scores.",
              "- Bytes: what crosses the wire per site per round in each direction (LoRA adapters, CNN, fusion, "
              "calibration, decoder, head); the frozen CLIP towers go once per site, by content hash. Full-model "
              "FedAvg would send every tensor every round.", ""]
    (out / "qata_results.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["dice_per_image"] for r in rows], 0.4, label="per-image mean Dice")
    ax.bar([i + 0.2 for i in x], [r["dice_pooled"] for r in rows], 0.4, label="pooled Dice")
    ax.set_xticks(list(x), [r["arm"] for r in rows])
    ax.set_ylim(0, 1)
    ax.set_title(f"QaTa-COV19 valid ({r0['image_size']} px, {args.config} setting)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "qata_dice.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, skip cleanly without the dataset, run the arms, write the report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(EXPERIMENTS), default="cpu", help="cpu (2 cores) or paper (GPU)")
    p.add_argument("--out", default=str(PROJECT / "results" / "studies" / "qata"))
    p.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma list of {', '.join(ARMS)}")
    p.add_argument("--rounds", type=int, default=None, help="federated rounds / centralized epochs (default: config)")
    p.add_argument("--local-steps", type=int, default=None, help="steps per site per round (default: config)")
    p.add_argument("--image-size", type=int, default=None, help="model input size (default: config)")
    p.add_argument("--valid-limit", type=int, default=None, help="evaluate on the first N valid images (default all)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds x 4 steps, 60 valid images")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: all cores on an idle machine, 1 on a busy one: under contention "
                        "OpenMP threads wait on each other: 2 threads ran ~30x slower than 1 on a busy 2-core box)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="only the per-arm result lines")
    p.add_argument("--append", action="store_true",
                   help="keep the other arms' rows of an earlier qata_results.csv in --out (same settings!)")
    p.add_argument("override", nargs="*", help="extra Hydra overrides for every arm, e.g. train.lr=2e-3")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.local_steps = args.rounds or 2, args.local_steps or 4
        args.valid_limit = args.valid_limit or 60
    src = qata_source()
    if not ((src / "train.csv").is_file() and (src / "valid.csv").is_file()):
        print(f"qata_study: skipped: QaTa-COV19 not found at {src} (set FEDTEXTSEG_QATA to the folder holding "
              "train.csv, train/, valid.csv, valid/)")
        return 0
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    busy = os.getloadavg()[0] >= 1.0 if hasattr(os, "getloadavg") else False
    threads = args.threads or (1 if busy and not torch.cuda.is_available() else os.cpu_count() or 1)
    torch.set_num_threads(threads)
    print(f"qata_study: {threads} torch thread(s) (load average {os.getloadavg()[0]:.1f}); QaTa-COV19 at {src}")
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    from fedtextseg.config import compose_config
    from fedtextseg.sites import ensure_data

    start, rows = time.perf_counter(), []
    if args.append and (out / "qata_results.csv").is_file():
        rows = [r for r in read_rows(out / "qata_results.csv") if r["arm"] not in arms]
    ensure_data(compose_config(EXPERIMENTS[args.config], _overrides(args, out, "fed-text")))  # split + valid site
    for arm in arms:
        rows.append(run_arm(arm, args, out))
        (out / "partial.json").write_text(json.dumps(rows, indent=2))  # what finished, if the study is cut short
    write_outputs(rows, args, out, time.perf_counter() - start)
    (out / "partial.json").unlink(missing_ok=True)
    print((out / "qata_results.md").read_text())
    print(f"qata_study: wrote {out / 'qata_results.md'}, {out / 'qata_results.csv'}"
          + (f", {out / 'qata_dice.png'}" if (out / "qata_dice.png").exists() else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
