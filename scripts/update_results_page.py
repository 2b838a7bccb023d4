"""Regenerate ``docs/results.md`` from ``results/studies/*`` (tables, plots copied to ``docs/images/results/``,
date and machine of each study): ``python scripts/update_results_page.py [--studies DIR] [--page FILE]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedtextseg.studies.results_page import build_results_page  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", default="results/studies", help="folder holding <study>/table.md")
    p.add_argument("--page", default="docs/results.md")
    args = p.parse_args()
    print(f"wrote {build_results_page(args.studies, args.page)}")
