"""Privacy for fedtextseg: DP-SGD at each site with per-site budgets, persistent accounting, decline when spent,
a message audit on everything a site sends, and (optionally) Flower's SecAgg+ for the arrays a site sends.

- :mod:`~fedtextseg.privacy.settings`: :class:`PrivacySettings` from the run config, site.yaml and node config.
- :mod:`~fedtextseg.privacy.accounting`: RDP/PRV epsilon of a Sampled-Gaussian history, noise planning, the
  on-disk :class:`SiteLedger`.
- :mod:`~fedtextseg.privacy.dpsgd`: Opacus wrapping for ``engine.train_steps`` (Poisson batches of volumes,
  per-volume clipping, hooks or ghost clipping).
- :mod:`~fedtextseg.privacy.site`: :class:`SitePrivacy` (a private round, or a decline), metric screening.
- :mod:`~fedtextseg.privacy.server`: declines, ``privacy`` rows and ``privacy.json`` on the server.
- :mod:`~fedtextseg.privacy.audit`: the allow-list every reply of a ClientApp is checked against.
- :mod:`~fedtextseg.privacy.secure`: the linear encoding that lets SecAgg+ sum group-wise/class-aware updates.

Nothing here imports Flower (the audit works on any object with Flower's record attributes). See docs/privacy.md.
"""

from fedtextseg.privacy.accounting import SiteLedger, epsilon_for, plan_noise_multiplier
from fedtextseg.privacy.server import record_privacy, run_key_for, split_declined, write_privacy_ledger
from fedtextseg.privacy.settings import PrivacySettings, resolve_settings
from fedtextseg.privacy.site import DECLINED_KEY, PrivateTrainStats, SitePrivacy, screen_eval_summary

__all__ = [
    "DECLINED_KEY", "PrivacySettings", "PrivateTrainStats", "SiteLedger", "SitePrivacy", "epsilon_for",
    "plan_noise_multiplier", "record_privacy", "resolve_settings", "run_key_for", "screen_eval_summary",
    "split_declined", "write_privacy_ledger",
]
