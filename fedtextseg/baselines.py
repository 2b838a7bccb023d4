"""The baselines a federated partial-label method is compared with, built from the same parts as every other run.

* :func:`train_local_only`: every site trains alone, with the compute it has in a federated run (``federation.rounds``
  epochs of ``train.local_steps`` steps, on its own data and partial labels), through
  :func:`fedtextseg.centralized.train_centralized` restricted to that one site. Each site's model is then evaluated
  on every other site (``cross_eval`` rows) besides its own site and the unseen hospital.
* :func:`with_federation_label_space`: the config of a naive-softmax FedAvg run (``train.loss=naive``) with its
  softmax's classes set to the union of the classes the federation's sites annotate (the label space naive FedAvg
  agrees on up front), unless the config names them already.

Layout of a local-only run folder: one sub-folder per site, each an ordinary run record (``config.yaml``,
``metadata.json``, ``metrics.jsonl`` with ``site_eval`` on its own site, ``unseen_eval``, ``cross_eval`` on the
other sites, ``model.pt``).
"""

from __future__ import annotations

import copy
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fedtextseg.sites import data_root, ensure_data, unseen_site

__all__ = ["train_local_only", "federation_label_space", "with_federation_label_space", "CROSS_EVAL"]

CROSS_EVAL = "cross_eval"  # metrics.jsonl kind: a local model evaluated on another site's validation cases


def federation_label_space(cfg: DictConfig) -> list[str]:
    """The union of the classes the configured sites annotate, in vocabulary order."""
    from fedtextseg.data.site import load_site
    from fedtextseg.vocab import get_vocabulary

    vocab = get_vocabulary(cfg.data.vocabulary)
    annotated = {c for path in ensure_data(cfg, log_fn=lambda *_: None)
                 for c in load_site(path, cfg.data.vocabulary).annotated}
    return [c for c in vocab.class_names if c in annotated]


def with_federation_label_space(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``train.naive_classes`` = :func:`federation_label_space` for a naive run that names none."""
    if cfg.train.loss != "naive" or cfg.train.naive_classes:
        return cfg
    out = copy.deepcopy(cfg)
    out.train.naive_classes = federation_label_space(cfg)
    return out


def _single_site_config(cfg: DictConfig, site: Path) -> DictConfig:
    out = copy.deepcopy(cfg)
    OmegaConf.set_struct(out, False)
    out.data.sites = [str(site.resolve().relative_to(data_root(cfg)))]
    out.data.unseen = None  # evaluated once, on the final model, like the federated runs' final round
    return out


def train_local_only(cfg: DictConfig, run_dir: str | Path, *, log_fn=print) -> Path:
    """Train one model per site on that site alone; evaluate each on its site, the others and the unseen one."""
    from fedtextseg.centralized import train_centralized
    from fedtextseg.model_file import load_model_file
    from fedtextseg.runtime import SiteRunner
    from fedtextseg.tracking import RunRecorder

    run_dir = Path(run_dir)
    sites = ensure_data(cfg, log_fn=log_fn)
    unseen = unseen_site(cfg)
    rounds = int(cfg.federation.rounds)
    for site in sites:
        site_dir = run_dir / site.name
        train_centralized(_single_site_config(cfg, site), site_dir, epochs=rounds, log_fn=log_fn)
        model, _ = load_model_file(site_dir / "model.pt")
        recorder = RunRecorder(site_dir, resume=True)
        recorder.update_metadata(mode="local-only", trained_on=site.name)
        for other in sites:
            if other != site:
                runner = SiteRunner(cfg, other, model)
                recorder.log_per_class(CROSS_EVAL, rounds, runner.site.name, runner.evaluate())
        if unseen is not None:  # every case of the unseen hospital, as in a federated run's final round
            runner = SiteRunner(cfg, unseen, model)
            recorder.log_per_class("unseen_eval", rounds, f"unseen:{runner.site.name}",
                                   runner.evaluate(runner.all_cases_dataset(), max_cases=None))
        log_fn(f"local-only: {site.name}'s model evaluated on {len(sites) - 1} other site(s)"
               + (" and the unseen hospital" if unseen is not None else ""))
    return run_dir
