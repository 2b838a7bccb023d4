"""Benchmark studies: one command per study (``fedtextseg study <name>``), arms defined as data in
``configs/study/<name>.yaml``, each study writing a table (Markdown + CSV), plots (PNG), the resolved configs and
seeds to ``results/studies/<name>/``.

* :mod:`.spec` - study files: arms (Hydra overrides over a base experiment), sizes (cpu / paper budgets);
* :mod:`.runner` - runs every arm x seed through the project's training entry points, measures time and memory;
* :mod:`.collect` - run folders -> per-run records -> mean and std over seeds;
* :mod:`.report` and :mod:`.plots` - the tables and figures; :mod:`.results_page` - ``docs/results.md``.
"""

from fedtextseg.studies.spec import ArmSpec, StudySpec, list_studies, load_study

__all__ = ["ArmSpec", "StudySpec", "list_studies", "load_study"]
