"""A site's privacy settings: run defaults (``configs/privacy/*.yaml``), the site's ``site.yaml`` ``privacy:`` block
and the SuperNode's node config, resolved into one :class:`PrivacySettings`.

Where each knob may be set (the more specific source wins, key by key)::

    run config (privacy/dp.yaml)   site.yaml privacy: block    SuperNode --node-config
    enabled                         -                           -
    accountant                      accountant                  privacy-accountant
    target_epsilon                  target_epsilon              privacy-target-epsilon
    target_delta                    target_delta                privacy-delta (or privacy-target-delta)
    noise_multiplier                noise_multiplier            privacy-noise-multiplier
    max_grad_norm                   max_grad_norm               privacy-max-grad-norm

A site may only *add* protection: any budget key in its site.yaml or node config turns DP-SGD on for that site even
when the run's ``privacy.enabled`` is false; nothing a site sets turns it off.

Target epsilon vs. fixed noise: when the effective ``target_epsilon`` comes from a more specific source than the
effective ``noise_multiplier`` (e.g. the site sets a budget, the run a default noise), the noise multiplier is
planned from the site's target; when the noise multiplier is at least as specific, it is used as given and the
target epsilon only caps the spending (the site declines rounds that would exceed it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from fedtextseg.errors import ConfigError

__all__ = ["PrivacySettings", "resolve_settings", "SITE_KEYS", "NODE_KEYS", "RUN_KEYS"]

#: site.yaml ``privacy:`` keys
SITE_KEYS = ("accountant", "target_epsilon", "target_delta", "noise_multiplier", "max_grad_norm")
#: node-config key -> setting
NODE_KEYS = {
    "privacy-accountant": "accountant",
    "privacy-target-epsilon": "target_epsilon",
    "privacy-delta": "target_delta",
    "privacy-target-delta": "target_delta",
    "privacy-noise-multiplier": "noise_multiplier",
    "privacy-max-grad-norm": "max_grad_norm",
}
ACCOUNTANTS = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("microbatch", "hooks", "fast", "ghost")  # fedtextseg.privacy.dpsgd says what each does
SECURE_AGGREGATION = ("none", "secaggplus")


@dataclass
class PrivacySettings:
    """Everything DP-SGD and the message policy of one site need. ``source`` says where each budget value came
    from (``run``, ``site.yaml`` or ``node-config``)."""

    enabled: bool = False
    accountant: str = "rdp"
    target_epsilon: float | None = None  # budget for the whole run (None: no cap; noise_multiplier required)
    target_delta: float = 1e-5
    noise_multiplier: float | None = None  # None: planned from target_epsilon for rounds x local steps
    max_grad_norm: float = 1.0  # per-volume clipping bound C
    expected_batch_size: int | None = None  # volumes per step on average (Poisson); None: train.batch_size
    grad_sample_mode: str = "microbatch"  # microbatch | hooks (both exact per-volume clipping) | fast | ghost
    min_samples_for_metrics: int = 0  # evaluation metrics over fewer validation cases are not sent
    metric_decimals: int | None = None  # round every sent metric to this many decimals
    report_train_loss: bool = False  # the training loss is outside the DP guarantee: off under DP by default
    ledger_dir: str | None = None  # site-side accountant files (None: $FEDTEXTSEG_CACHE/privacy)
    secure_aggregation: str = "none"  # none | secaggplus (Flower's SecAgg+ for the shared + per-class arrays)
    source: dict[str, str] = field(default_factory=dict)

    @property
    def planned(self) -> bool:
        """Whether the noise multiplier is chosen up front from the target epsilon."""
        return self.enabled and self.noise_multiplier is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self, where: str = "privacy settings") -> "PrivacySettings":
        """Raise :class:`ConfigError` listing every invalid value (and what to change)."""
        problems = []
        if self.accountant not in ACCOUNTANTS:
            problems.append(f"accountant {self.accountant!r} is not one of {', '.join(ACCOUNTANTS)}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            problems.append(f"grad_sample_mode {self.grad_sample_mode!r} is not one of {', '.join(GRAD_SAMPLE_MODES)}")
        if self.secure_aggregation not in SECURE_AGGREGATION:
            problems.append(f"secure_aggregation {self.secure_aggregation!r} is not one of "
                            f"{', '.join(SECURE_AGGREGATION)}")
        if self.target_epsilon is not None and not (self.target_epsilon > 0 and math.isfinite(self.target_epsilon)):
            problems.append(f"target_epsilon must be a positive number, got {self.target_epsilon}")
        if not 0 < self.target_delta < 1:
            problems.append(f"target_delta must be in (0, 1), got {self.target_delta}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            problems.append(f"noise_multiplier must be > 0 (0 would mean no privacy), got {self.noise_multiplier}")
        if not self.max_grad_norm > 0:
            problems.append(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.expected_batch_size is not None and self.expected_batch_size < 1:
            problems.append(f"expected_batch_size must be >= 1, got {self.expected_batch_size}")
        if self.min_samples_for_metrics < 0:
            problems.append(f"min_samples_for_metrics must be >= 0, got {self.min_samples_for_metrics}")
        if self.enabled and self.target_epsilon is None and self.noise_multiplier is None:
            problems.append("DP-SGD needs a budget: set target_epsilon (the noise is then planned) or a fixed "
                            "noise_multiplier")
        if problems:
            raise ConfigError(f"{where}: " + "; ".join(problems))
        return self


def _number(value: Any, key: str, where: str) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none")):
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}") from None


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def resolve_settings(run: Mapping[str, Any] | None, site: Mapping[str, Any] | None = None,
                     node_config: Mapping[str, Any] | None = None, *, train_batch_size: int | None = None,
                     site_name: str = "site") -> PrivacySettings:
    """Merge the run's ``privacy`` config, a site's ``site.yaml`` block and its node config (see module doc)."""
    run = dict(run or {})
    site = dict(site or {})
    node = {NODE_KEYS[k]: v for k, v in dict(node_config or {}).items() if k in NODE_KEYS}
    unknown = sorted(set(site) - set(SITE_KEYS))
    if unknown:
        raise ConfigError(f"site {site_name!r}: unknown key(s) {unknown} in the site.yaml privacy block; valid keys: "
                          f"{', '.join(SITE_KEYS)}")
    s = PrivacySettings()
    levels: dict[str, int] = {}
    for level, (name, values) in enumerate((("run", run), ("site.yaml", site), ("node-config", node))):
        for key in SITE_KEYS:
            if key not in values or values[key] is None:
                continue
            where = f"site {site_name!r} ({name})"
            value = str(values[key]).strip().lower() if key == "accountant" else _number(values[key], key, where)
            if value is None:
                continue
            setattr(s, key, value)
            s.source[key] = name
            levels[key] = level
    site_sets_budget = any(lvl > 0 for lvl in levels.values())
    s.enabled = _as_bool(run.get("enabled", False)) or site_sets_budget
    if s.enabled and s.target_epsilon is not None and s.noise_multiplier is not None \
            and levels["target_epsilon"] > levels["noise_multiplier"]:
        s.noise_multiplier = None  # the site's own target is more specific than a default noise: plan from it
        s.source["noise_multiplier"] = f"planned from target_epsilon ({s.source['target_epsilon']})"
    ebs = run.get("expected_batch_size")
    s.expected_batch_size = int(ebs) if ebs not in (None, "") else (int(train_batch_size) if train_batch_size else None)
    s.grad_sample_mode = str(run.get("grad_sample_mode") or "microbatch").lower()
    s.min_samples_for_metrics = int(run.get("min_samples_for_metrics") or 0)
    s.metric_decimals = None if run.get("metric_decimals") in (None, "") else int(run["metric_decimals"])
    # without DP the loss is sent as always; under DP only if the run explicitly allows it (it is not private)
    s.report_train_loss = (not s.enabled) or _as_bool(run.get("report_train_loss", False))
    s.ledger_dir = str(run["ledger_dir"]) if run.get("ledger_dir") else None
    s.secure_aggregation = str(run.get("secure_aggregation") or "none").lower()
    return s.validate(f"privacy settings of site {site_name!r}")
