"""Which site folders a run uses: the federation's list, the unseen hospital, and one node's own site.

A data config names a ``root`` and either an explicit ``sites`` list (paths relative to ``root``) or nothing, in
which case ``<root>/federation.yaml`` (written by ``fedtextseg synth``) lists them. A synthetic data config with a
``generate`` block creates the hospitals on first use, so the demo runs on a fresh machine.

A Flower node finds its site from its node config: ``site-path`` (deployment, one hospital per SuperNode) or
``partition-id`` (simulation: the n-th listed site).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import yaml
from omegaconf import DictConfig

from fedtextseg.errors import ConfigError

__all__ = ["data_root", "federation_sites", "unseen_site", "ensure_data", "resolve_site_path"]

log = logging.getLogger(__name__)


def data_root(cfg: DictConfig) -> Path:
    return Path(str(cfg.data.root)).expanduser().resolve()


def _federation_file(cfg: DictConfig) -> dict:
    path = data_root(cfg) / "federation.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: no federation.yaml; list the site folders in data.sites, or generate synthetic "
                          f"hospitals with `fedtextseg synth --out {data_root(cfg)}`")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: cannot read federation.yaml: {exc}") from None


def federation_sites(cfg: DictConfig) -> list[Path]:
    """The training sites, in order (partition ``i`` trains on element ``i``)."""
    root = data_root(cfg)
    if cfg.data.sites:
        paths = [root / str(s) for s in cfg.data.sites]
    else:
        paths = [root / str(e["path"]) for e in _federation_file(cfg).get("sites", [])]
    if not paths:
        raise ConfigError(f"no sites configured under {root}")
    return paths


def unseen_site(cfg: DictConfig) -> Path | None:
    """The held-out hospital for server-side evaluation, if the data config names one and it exists."""
    name = cfg.data.unseen
    if not name:
        return None
    path = data_root(cfg) / str(name)
    return path if path.is_dir() else None


def ensure_data(cfg: DictConfig, log_fn=print) -> list[Path]:
    """Generate the synthetic hospitals if the config asks for them and they are absent; return the sites.

    ``data.kind`` picks the generator: ``synthetic`` (default, 3D CT), ``xray`` (2D chest X-rays) or ``qata`` (the
    non-IID split of the real QaTa-COV19 training set, with its valid split as the unseen hospital)."""
    root = data_root(cfg)
    gen = cfg.data.generate
    kind = str(cfg.data.kind)
    if gen and kind == "xray" and not (root / "federation.yaml").is_file():
        from fedtextseg.synthetic.xray import prepare_synthetic_xray_federation  # 2D synthetic chest X-rays

        prepare_synthetic_xray_federation(root, gen, unseen=cfg.data.unseen, log_fn=log_fn)
    elif gen and kind == "qata" and not (root / "federation.yaml").is_file():
        from fedtextseg.config import configs_dir  # the real QaTa-COV19 X-rays, split into hospitals
        from fedtextseg.data.qata import prepare_qata_federation

        prepare_qata_federation(root, gen, unseen=cfg.data.unseen, log_fn=log_fn,
                                project_root=configs_dir().parent)
    elif gen and not (root / "federation.yaml").is_file():
        from fedtextseg.synthetic.ct import generate_hospitals

        log_fn(f"generating synthetic hospitals in {root} ({gen.sites} sites x {gen.cases_per_site} cases, "
               f"shape {list(gen.shape)}, seed {gen.seed}) ...")
        generate_hospitals(root, sites=int(gen.sites), cases_per_site=int(gen.cases_per_site), seed=int(gen.seed),
                           shape=tuple(gen.shape), unseen=bool(cfg.data.unseen),
                           force=True)  # force: only the generator's own leftovers (an interrupted run) are replaced
    return federation_sites(cfg)


def resolve_site_path(cfg: DictConfig, node_config: Mapping[str, object]) -> Path:
    """This node's site folder: ``site-path`` from the node config, else the ``partition-id``-th listed site."""
    if node_config.get("site-path"):
        path = Path(str(node_config["site-path"])).expanduser()
        if not path.is_dir():
            raise ConfigError(f"site-path {path} (from the SuperNode's --node-config) is not a folder")
        return path
    if "partition-id" not in node_config:
        raise ConfigError("this node has neither 'site-path' nor 'partition-id' in its node config; start the "
                          "SuperNode with --node-config 'site-path=\"/path/to/site\"'")
    sites = federation_sites(cfg)
    pid = int(node_config["partition-id"])
    if pid >= len(sites):
        raise ConfigError(f"simulation node {pid} has no site: only {len(sites)} sites are configured "
                          f"({', '.join(p.name for p in sites)}); run with num-supernodes={len(sites)}")
    return sites[pid]
