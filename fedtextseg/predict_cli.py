"""``fedtextseg predict``: the command line over both predictors - a 3D model file segments NIfTI volumes
(:mod:`fedtextseg.predict`), a 2D report-guided one segments chest X-ray images with their reports
(:mod:`fedtextseg.predict_xray`). The model file's vocabulary decides which; options of the other kind are refused.
"""

from __future__ import annotations

import argparse
import sys

from fedtextseg.predict import Predictor, predict_batch
from fedtextseg.predict_xray import XrayPredictor, predict_xray_batch, read_reports
from fedtextseg.vocab import get_vocabulary

__all__ = ["predict_main"]

DESCRIPTION = "Segment NIfTI volumes (3D models) or chest X-ray images with their reports (2D models) by class name."


def predict_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedtextseg predict", description=DESCRIPTION)
    p.add_argument("-m", "--model", required=True, help="trained model file (results/<run>/model.pt)")
    p.add_argument("-i", "--input", nargs="+",
                   help="NIfTI volume(s) and/or folder(s) of them (2D models: PNG/JPEG images or folders)")
    p.add_argument("-o", "--out", help="output folder")
    p.add_argument("--classes", nargs="+", default=None,
                   help="class names, synonyms or groups (default: every class the federation was trained on)")
    p.add_argument("--task", default=None, help="task prompt (dataset) to condition on (default: the vocabulary's)")
    p.add_argument("--threshold", type=float, default=None, help="probability threshold (default: the model's)")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default: the model's)")
    p.add_argument("--keep-largest", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the largest connected component of each organ (default: as in training)")
    p.add_argument("--multilabel", action="store_true", help="also write one multi-label map per case + legend")
    p.add_argument("--no-per-class", action="store_true", help="no per-class files (with --multilabel)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="sliding-window progress bar (default: when stderr is a terminal)")
    p.add_argument("--report", default=None,
                   help="2D models: the report conditioning every input image (\"\": none, the task prompt)")
    p.add_argument("--reports", default=None,
                   help="2D models: CSV with columns image,caption giving each input image its own report")
    p.add_argument("--probabilities", action="store_true", help="2D models: also write probability PNGs")
    p.add_argument("--list-classes", action="store_true", help="print the model's classes and exit")
    args = p.parse_args(argv)
    if not args.list_classes and not (args.input and args.out):
        p.error("the following arguments are required: -i/--input, -o/--out")
    if args.no_per_class and not args.multilabel:
        p.error("--no-per-class writes nothing without --multilabel")
    from fedtextseg.model_card import check_model_file
    from fedtextseg.model_file import load_model_file

    model, info = load_model_file(check_model_file(args.model))
    if args.list_classes:
        trained = info.get("annotated_by") or {}
        print("\n".join(c + (f"  (annotated by {', '.join(trained[c])})" if c in trained else "")
                        for c in info["class_names"]))
        return 0
    if get_vocabulary(info.get("vocabulary")).spatial_dims == 2:
        return _predict_xray_main(p, args, model, info)
    if args.report is not None or args.reports or args.probabilities:
        p.error(f"--report, --reports and --probabilities are for 2D report-guided models; {info['model_name']} "
                "segments 3D volumes")
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    predictor = Predictor(model, info, classes=args.classes, task=args.task, threshold=args.threshold,
                          overlap=args.overlap, keep_largest=args.keep_largest, device=args.device, progress=progress)
    if predictor.untrained:
        print(f"fedtextseg predict: warning: no training site annotated {', '.join(predictor.untrained)}; "
              "those masks come from the text prompt alone", file=sys.stderr)
    print(f"model {info['model_name']} on {predictor.device}, task {predictor.task}, threshold {predictor.threshold}, "
          f"{len(predictor.classes)} classes", file=sys.stderr)
    result = predict_batch(predictor, args.input, args.out, per_class=not args.no_per_class,
                           multilabel=args.multilabel, log_fn=lambda m: print(m, file=sys.stderr))
    total = len(result.cases) + len(result.failed)
    print(f"fedtextseg predict: {len(result.cases)} of {total} inputs segmented -> {args.out}"
          + (f"; {len(result.failed)} failed" if result.failed else ""), file=sys.stderr)
    return result.exit_code


def _predict_xray_main(p: argparse.ArgumentParser, args: argparse.Namespace, model, info) -> int:
    """The 2D half of ``predict_main``: a TGC-Net model file, X-ray images and their reports."""
    if args.report is not None and args.reports:
        p.error("give one report for every image (--report) or a CSV of reports (--reports), not both")
    if args.multilabel or args.no_per_class:
        p.error("--multilabel/--no-per-class are for 3D models; a 2D model writes one mask PNG per class")
    reports = read_reports(args.reports) if args.reports else None
    predictor = XrayPredictor(model, info, classes=args.classes, task=args.task, threshold=args.threshold,
                              keep_largest=args.keep_largest, device=args.device)
    if args.report is None and reports is None and predictor.with_text:
        print("fedtextseg predict: warning: no --report or --reports given: every image is conditioned on the task "
              f"prompt of {predictor.task!r}, not on its report", file=sys.stderr)
    print(f"model {info['model_name']} on {predictor.device}, task {predictor.task}, threshold {predictor.threshold}, "
          f"input {predictor.size}x{predictor.size}, {len(predictor.classes)} classes", file=sys.stderr)
    result = predict_xray_batch(predictor, args.input, args.out, report=args.report, reports=reports,
                                reports_name=str(args.reports), probabilities=args.probabilities,
                                log_fn=lambda m: print(m, file=sys.stderr))
    total = len(result.cases) + len(result.failed)
    print(f"fedtextseg predict: {len(result.cases)} of {total} images segmented -> {args.out}"
          + (f"; {len(result.failed)} failed" if result.failed else ""), file=sys.stderr)
    return result.exit_code
