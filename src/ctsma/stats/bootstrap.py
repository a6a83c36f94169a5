"""Patient-level (cluster) bootstrap.

Patches of one knee are not independent, so confidence intervals resample whole PATIENTS (groups)
with replacement and recompute the statistic on all rows of the drawn patients. A patient drawn twice
contributes its rows twice; for DataFrames the column ``_cluster`` numbers the draws, so a statistic
that first aggregates per patient can group by ``_cluster`` and keep the duplicates apart.

Paired differences (e.g. ICC of distilled minus ICC of baseline on the same patients) use the same
resampled patients for both statistics in each replicate, which is what makes them paired.
Percentile intervals; replicates where the statistic is not finite (e.g. a resample with one class)
are dropped and counted in ``n_failed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class BootstrapResult:
    estimate: float
    ci: tuple[float, float]
    se: float
    n_boot: int
    n_failed: int
    p: float | None = None  # two-sided bootstrap p-value of "statistic = 0" (differences only)
    replicates: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)


def _group_indices(groups) -> list[np.ndarray]:
    codes, uniq = pd.factorize(pd.Series(np.asarray(groups)), sort=True)
    if len(uniq) < 2:
        raise ValueError("a cluster bootstrap needs at least 2 groups (patients)")
    order = np.argsort(codes, kind="stable")
    bounds = np.cumsum(np.bincount(codes, minlength=len(uniq)))[:-1]
    return np.split(order, bounds)


def _make_sampler(data, groups):
    """Return (n_groups, take(draws) -> args for the statistic, full args)."""
    if isinstance(data, pd.DataFrame):
        g = data[groups].to_numpy() if isinstance(groups, str) else np.asarray(groups)
        idx = _group_indices(g)

        def take(draws):
            rows = np.concatenate([idx[d] for d in draws])
            sub = data.iloc[rows].reset_index(drop=True)
            sub["_cluster"] = np.repeat(np.arange(len(draws)), [len(idx[d]) for d in draws])
            return (sub,)

        full = data.copy()
        full["_cluster"] = pd.factorize(pd.Series(g), sort=True)[0]
        return len(idx), take, (full,)
    arrays = data if isinstance(data, (tuple, list)) else (data,)
    arrays = tuple(np.asarray(a) for a in arrays)
    idx = _group_indices(groups)
    n = len(np.asarray(groups))
    if any(len(a) != n for a in arrays):
        raise ValueError("every data array must have one row per entry of groups")

    def take(draws):
        rows = np.concatenate([idx[d] for d in draws])
        return tuple(a[rows] for a in arrays)

    return len(idx), take, arrays


def _run(statistic: Callable[..., Any], data, groups, n_boot: int, seed: int) -> tuple[float, np.ndarray]:
    n_groups, take, full = _make_sampler(data, groups)
    estimate = float(statistic(*full))
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for b in range(n_boot):
        draws = rng.integers(0, n_groups, n_groups)
        try:
            reps[b] = float(statistic(*take(draws)))
        except (ValueError, ZeroDivisionError, FloatingPointError):
            reps[b] = np.nan
    return estimate, reps


def _summarise(estimate, reps, alpha, n_boot, with_p: bool) -> BootstrapResult:
    ok = reps[np.isfinite(reps)]
    if ok.size < max(10, n_boot // 2):
        ci, se, p = (float("nan"), float("nan")), float("nan"), (float("nan") if with_p else None)
    else:
        lo, hi = np.quantile(ok, [alpha / 2, 1 - alpha / 2])
        ci, se = (float(lo), float(hi)), float(ok.std(ddof=1))
        p = None
        if with_p:  # two-sided, with the +1 correction so that p is never exactly 0
            tail = min(np.sum(ok <= 0), np.sum(ok >= 0))
            p = float(min(1.0, 2 * (tail + 1) / (ok.size + 1)))
    return BootstrapResult(estimate, ci, se, n_boot, int(reps.size - ok.size), p, reps)


def cluster_bootstrap(statistic: Callable[..., float], data, groups, *, n_boot: int = 1000, seed: int = 0,
                      alpha: float = 0.05) -> BootstrapResult:
    """Bootstrap CI of ``statistic`` resampling groups (patients).

    ``data`` is a DataFrame (``statistic(df)``; ``groups`` may be a column name), or an array or a
    tuple of arrays with one row per entry of ``groups`` (``statistic(*arrays)``).
    """
    est, reps = _run(statistic, data, groups, n_boot, seed)
    return _summarise(est, reps, alpha, n_boot, with_p=False)


def cluster_bootstrap_diff(statistic_a: Callable[..., float], statistic_b: Callable[..., float], data, groups, *,
                           n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> BootstrapResult:
    """Paired bootstrap of ``statistic_a − statistic_b`` on the same resampled patients, with a p-value."""
    est, reps = _run(lambda *a: statistic_a(*a) - statistic_b(*a), data, groups, n_boot, seed)
    return _summarise(est, reps, alpha, n_boot, with_p=True)
