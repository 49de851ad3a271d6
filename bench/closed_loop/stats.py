"""Confidence intervals for the closed-loop benchmark (95 % by default).

* ``wilson``: the Wilson score interval of a binomial success rate (k successes in n episodes).
  Used for every success rate that is a count of episodes: a task, a suite (its tasks' episodes
  pooled) and a method's final step (all its episodes pooled). Unlike the normal approximation it
  stays inside [0, 1] and is not degenerate at 0 % or 100 %.
* ``bootstrap_average`` / ``bootstrap_bwt``: percentile bootstrap over tasks for the quantities
  that are averages of per-task rates (the suite-weighted average success and BWT). Each resample
  draws, within every suite, that suite's tasks with replacement (so every suite keeps its weight
  and the estimand stays defined), then each drawn task's episodes with replacement (so a suite of
  one task still carries its episode noise). BWT pairs step i and step T of a task on the same
  resampled episode indices: episode j has the same seeded placement at every step.

Everything is seeded (``numpy.random.default_rng(seed)``), so the same results give the same
intervals, and ``publish`` output is deterministic.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # two-sided 95 % normal quantile
N_BOOT = 2000
BOOT_SEED = 12345


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval ``(lo, hi)`` for ``k`` successes out of ``n`` (``(0, 1)`` if n=0)."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    den = 1.0 + z2 / n
    mid = (p + z2 / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / den
    # the interval is inside [0, 1] analytically and touches 0 (1) exactly when k = 0 (k = n);
    # pin those ends so float rounding does not print 99.99... for a perfect score
    lo = 0.0 if k == 0 else max(0.0, mid - half)
    hi = 1.0 if k == n else min(1.0, mid + half)
    return lo, hi


def episodes_for_halfwidth(n_tasks: int, half_width: float = 0.05, p: float = 0.5,
                           z: float = Z95) -> int:
    """Episodes per task so that a pooled rate over ``n_tasks`` tasks has a normal-approximation
    half-width of at most ``half_width`` in the worst case ``p = 0.5``."""
    if n_tasks < 1 or half_width <= 0:
        raise ValueError("episodes_for_halfwidth: need n_tasks >= 1 and half_width > 0")
    return math.ceil(z * z * p * (1 - p) / (half_width * half_width * n_tasks))


def _resampled_task_means(rng, tasks: list[tuple[np.ndarray, ...]], n_boot: int) -> np.ndarray:
    """One suite, vectorised: (n_boot,) bootstrap replicates of the mean over the suite's tasks
    of ``f(task)``, with tasks drawn with replacement per replicate and, independently for every
    drawn slot, the task's episodes drawn with replacement. A task is a tuple of equal-length
    0/1 arrays; its statistic is the mean of the first array, or for a pair (a, c) the paired
    difference ``mean(c[j]) - mean(a[j])`` on the same resampled episode indices ``j``."""
    m = len(tasks)
    pick = rng.integers(0, m, size=(n_boot, m))          # which task fills slot s
    total = np.zeros(n_boot)
    for s in range(m):
        per_task = np.empty((m, n_boot))
        for t, arrs in enumerate(tasks):
            n = len(arrs[0])
            j = rng.integers(0, n, size=(n_boot, n))
            if len(arrs) == 1:
                per_task[t] = arrs[0][j].mean(axis=1)
            else:
                per_task[t] = arrs[1][j].mean(axis=1) - arrs[0][j].mean(axis=1)
        total += per_task[pick[:, s], np.arange(n_boot)]
    return total / m


def _percentile(stats: np.ndarray, level: float) -> tuple[float, float]:
    a = (1.0 - level) / 2
    return float(np.quantile(stats, a)), float(np.quantile(stats, 1 - a))


def bootstrap_average(outcomes: list[list], n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                      level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of the suite-weighted average success (mean over suites of the mean
    over the suite's tasks).

    outcomes: per suite, per task, a 0/1 sequence of episode outcomes (empty ones are dropped).
    Returns None when there is nothing to resample.
    """
    suites = [[(np.asarray(o, dtype=float),) for o in suite if len(o)] for suite in outcomes]
    suites = [s for s in suites if s]
    if not suites:
        return None
    rng = np.random.default_rng(seed)
    stats = np.mean([_resampled_task_means(rng, s, n_boot) for s in suites], axis=0)
    return _percentile(stats, level)


def bootstrap_bwt(pairs: list[list[tuple]], n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                  level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of BWT = mean over suites i<T of (acc[T][i] - acc[i][i]).

    pairs: per earlier suite, per task, ``(outcomes at step i, outcomes at step T)``: 0/1
    sequences of the same length (episode j is seeded placement j at both steps, so they are
    resampled together). Returns None when there is nothing to resample.
    """
    suites = []
    for suite in pairs:
        tasks = []
        for a, c in suite:
            a, c = np.asarray(a, float), np.asarray(c, float)
            if len(a) != len(c):
                raise ValueError(f"bootstrap_bwt: paired outcomes differ in length "
                                 f"({len(a)} vs {len(c)})")
            if len(a):
                tasks.append((a, c))
        if tasks:
            suites.append(tasks)
    if not suites:
        return None
    rng = np.random.default_rng(seed)
    stats = np.mean([_resampled_task_means(rng, s, n_boot) for s in suites], axis=0)
    return _percentile(stats, level)
