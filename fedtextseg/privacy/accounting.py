"""Privacy accounting that survives processes: Opacus' RDP/PRV accountants fed a history kept on disk.

In deployment every Flower message starts a fresh ClientApp process, and a resumed run starts a new Flower run, so
an accountant object cannot live across rounds. Each site keeps a small JSON **ledger** per (run key, site) under
its own cache folder (``$FEDTEXTSEG_CACHE/privacy/<run key>/<site>.json``, or ``privacy.ledger_dir``): the
Sampled-Gaussian history ``[(noise_multiplier, sample_rate, steps), ...]`` of every round it trained (Opacus'
accountant ``history`` format) plus one entry per round, trained or declined. The epsilon reported for a round is
recomputed from the whole history, so it is cumulative over every round the site took part in, whichever process
trained it.

Written atomically (temp file + ``os.replace``); a ledger that cannot be read is an error, never silently reset (a
reset would under-report the spending).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from fedtextseg.errors import BudgetExhaustedError, FedTextSegError

__all__ = ["epsilon_for", "plan_noise_multiplier", "SiteLedger", "ledger_path", "default_ledger_dir",
           "safe_name"]

LEDGER_VERSION = 1


def _accountant(kind: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    if kind == "rdp":
        return RDPAccountant()
    if kind == "prv":
        return PRVAccountant()
    raise FedTextSegError(f"unknown privacy accountant {kind!r} (rdp | prv)")


def epsilon_for(history: Iterable[Sequence[float]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` after the Sampled Gaussian steps ``[(noise_multiplier, sample_rate, steps), ...]``."""
    hist = tuple((float(s), float(q), int(n)) for s, q, n in history if int(n) > 0)
    return _epsilon_cached(hist, float(delta), str(accountant)) if hist else 0.0


@functools.lru_cache(maxsize=256)
def _epsilon_cached(history: tuple, delta: float, accountant: str) -> float:
    acc = _accountant(accountant)  # RDP at fractional orders costs ~0.1-1 s: every history is computed once
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def plan_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                          accountant: str = "rdp", history: Sequence[Sequence[float]] = ()) -> float:
    """The smallest noise multiplier (to 0.01 in epsilon) that keeps ``steps`` more steps within the target.

    Without a ``history`` this is Opacus' ``get_noise_multiplier``; with one (a plan changed in the middle of a run)
    the steps already taken are included and the multiplier is found by bisection on :func:`epsilon_for`.
    """
    from opacus.accountants.utils import get_noise_multiplier

    if steps <= 0:
        raise FedTextSegError(f"cannot plan DP noise for {steps} steps")
    what = (f"no noise multiplier keeps epsilon <= {target_epsilon} at delta={delta} for {steps} more step(s) at "
            f"sampling rate {sample_rate:.3g}")
    if not history:
        try:
            return float(get_noise_multiplier(target_epsilon=float(target_epsilon), target_delta=float(delta),
                                              sample_rate=float(sample_rate), steps=int(steps), accountant=accountant,
                                              epsilon_tolerance=0.01))
        except ValueError as exc:  # Opacus: unreachable even with very large noise
            raise FedTextSegError(f"{what}: {exc}") from None
    past = [list(h) for h in history]
    if epsilon_for(past, delta, accountant) >= target_epsilon:
        raise FedTextSegError(f"{what}: the steps already taken spent the whole budget")

    def eps(sigma: float) -> float:
        return epsilon_for(past + [[sigma, sample_rate, steps]], delta, accountant)

    lo, hi = 0.0, 10.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise FedTextSegError(what)
    while hi - lo > 1e-3 and target_epsilon - eps(hi) > 0.01:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if eps(mid) < target_epsilon else (mid, hi)
    return float(hi)


def default_ledger_dir() -> Path:
    from fedtextseg.data.dataset import default_cache_root

    return default_cache_root() / "privacy"


def safe_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(text)) or "_"


def ledger_path(run_key: str, site: str, ledger_dir: str | Path | None = None) -> Path:
    root = Path(ledger_dir).expanduser() if ledger_dir else default_ledger_dir()
    return root / safe_name(run_key) / f"{safe_name(site)}.json"


@dataclass
class SiteLedger:
    """One site's spending in one run: the Sampled-Gaussian history and the per-round record."""

    path: Path
    run_key: str
    site: str
    accountant: str = "rdp"
    delta: float = 1e-5
    history: list[list[float]] = field(default_factory=list)  # [noise_multiplier, sample_rate, steps] per round
    rounds: list[dict[str, Any]] = field(default_factory=list)
    plan: dict[str, Any] = field(default_factory=dict)  # the noise plan fixed at the site's first round

    # ------------------------------------------------------------------ persistence
    @classmethod
    def open(cls, run_key: str, site: str, *, accountant: str = "rdp", delta: float = 1e-5,
             ledger_dir: str | Path | None = None) -> "SiteLedger":
        """The ledger of (run_key, site), from disk if it exists (a fresh one otherwise)."""
        path = ledger_path(run_key, site, ledger_dir)
        if not path.is_file():
            return cls(path, str(run_key), str(site), accountant, float(delta))
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FedTextSegError(f"{path}: privacy ledger unreadable ({exc}); it records this site's spending, so it "
                                  "is not reset automatically: restore it or start a new run") from None
        if data.get("version") != LEDGER_VERSION or data.get("site") != str(site):
            raise FedTextSegError(f"{path}: not a version-{LEDGER_VERSION} privacy ledger of site {site!r}")
        if data.get("accountant", accountant) != accountant or float(data.get("delta", delta)) != float(delta):
            raise FedTextSegError(
                f"{path}: this run's spending was accounted with accountant={data.get('accountant')!r} at "
                f"delta={data.get('delta')}; the site now asks for accountant={accountant!r}, delta={delta}. Changing "
                "them in the middle of a run is not supported: keep the settings or start a new run")
        return cls(path, str(data["run_key"]), str(site), accountant, float(delta),
                   [list(h) for h in data.get("history", [])], list(data.get("rounds", [])), dict(data.get("plan", {})))

    def save(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": LEDGER_VERSION, "run_key": self.run_key, "site": self.site, "accountant": self.accountant,
                "delta": self.delta, "epsilon": self.epsilon(), "plan": self.plan, "history": self.history,
                "rounds": self.rounds}
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path)
        return self.path

    # ------------------------------------------------------------------ accounting
    @property
    def steps(self) -> int:
        return int(sum(int(h[2]) for h in self.history))

    @property
    def rounds_trained(self) -> int:
        return sum(1 for r in self.rounds if not r.get("declined"))

    def epsilon(self, extra: Sequence[float] | None = None) -> float:
        """Cumulative epsilon at this ledger's delta (with one more ``[sigma, q, steps]`` entry if given)."""
        hist = list(self.history) + ([list(extra)] if extra is not None else [])
        return epsilon_for(hist, self.delta, self.accountant)

    def check(self, sigma: float, sample_rate: float, steps: int, budget: float | None) -> float:
        """The epsilon the next round would reach; raises :class:`BudgetExhaustedError` when it exceeds ``budget``."""
        after = self.epsilon([sigma, sample_rate, steps])
        if budget is not None and after > budget:
            raise BudgetExhaustedError(
                f"site {self.site!r}: privacy budget exhausted: it has spent epsilon={self.epsilon():.3f} "
                f"(delta={self.delta:g}) over {self.rounds_trained} round(s); another round ({steps} steps, noise "
                f"multiplier {sigma:.3f}, sampling rate {sample_rate:.3g}) would reach {after:.3f} > target "
                f"{budget:g}. The site declines to train.")
        return after

    def record_round(self, round_: int, sigma: float, sample_rate: float, steps: int, **extra: Any) -> float:
        """Append a trained round and return the cumulative epsilon (call ``save`` to persist)."""
        if steps > 0:
            self.history.append([float(sigma), float(sample_rate), int(steps)])
        eps = self.epsilon()
        self.rounds.append({"round": int(round_), "declined": False, "noise_multiplier": float(sigma),
                            "sample_rate": float(sample_rate), "steps": int(steps), "epsilon": eps,
                            "time": round(time.time(), 3), **extra})
        return eps

    def record_decline(self, round_: int, would_reach: float, **extra: Any) -> None:
        self.rounds.append({"round": int(round_), "declined": True,
                            "epsilon_if_trained": would_reach if math.isfinite(would_reach) else None,
                            "epsilon": self.epsilon(), "time": round(time.time(), 3), **extra})
