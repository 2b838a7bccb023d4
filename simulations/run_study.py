"""One command per benchmark study: ``python simulations/run_study.py <study> [--config cpu|paper] [--seeds N]
[--out results/studies]``; the same as ``fedtextseg study ...`` (studies are defined in ``configs/study/``).

    python simulations/run_study.py main                  # every method, 2 seeds, the demo's budget (~70 min, 2 cores)
    python simulations/run_study.py privacy               # Dice vs epsilon
    python simulations/run_study.py scaling               # 2, 4, 8, 16 sites vs Dice, time per round, memory
    python simulations/run_study.py communication         # bytes per round per site per method
    python simulations/run_study.py main --config paper   # GPU budget

Then ``python scripts/update_results_page.py`` refreshes ``docs/results.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedtextseg.studies.runner import study_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(study_main(sys.argv[1:]))
