"""The ``fedtextseg`` command: one subcommand per job, each a thin front over a library function.

``fedtextseg --help`` lists them. User errors (bad sites, unknown names, bad configs) print one clear message and
exit with status 2, without a traceback; ``FEDTEXTSEG_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from fedtextseg.errors import FedTextSegError

# subcommand -> (module, function taking argv, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "synth": ("fedtextseg.synthetic.ct", "synth_main", "write synthetic partially labeled hospitals (NIfTI)"),
    "check-site": ("fedtextseg.data.checks", "check_site_main", "validate a site folder and summarise it"),
    "embed-text": ("fedtextseg.text.encoders", "embed_text_main", "encode class/task prompts into an embedding bank"),
    "train": ("fedtextseg.centralized", "train_main", "centralized (pooled) training on one or more sites"),
    "simulate": ("fedtextseg.simulate", "simulate_main", "run a Flower simulation of the synthetic hospitals (flwr run)"),
    "predict": ("fedtextseg.predict_cli", "predict_main", "segment NIfTI volumes with a trained model file, by class name"),
    "info": ("fedtextseg.model_card", "info_main", "print a model file's model card (architecture, provenance, classes)"),
    "report": ("fedtextseg.report", "report_main", "render a run folder into report.html and report.md"),
    "study": ("fedtextseg.studies.runner", "study_main", "run a benchmark study (configs/study/): table + plots"),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: fedtextseg <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run `fedtextseg <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from fedtextseg import __version__

        print(f"fedtextseg {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, list(COMMANDS), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        print(f"fedtextseg: unknown command {command!r}.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=os.environ.get("FEDTEXTSEG_LOGLEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    module, func, _ = COMMANDS[command]
    try:
        entry = getattr(importlib.import_module(module), func)
        return int(entry(rest) or 0)
    except FedTextSegError as exc:
        if os.environ.get("FEDTEXTSEG_DEBUG"):
            raise
        print(f"fedtextseg {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedtextseg {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
