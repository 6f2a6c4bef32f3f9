"""Spread over seeds: mean ± standard deviation, and a paired difference with its 95% t interval.

Seeds pair the runs: strategy A and MiT trained with seed s share the data order and the draws of
everything seeded, so the difference per seed removes what the seed does to both. The interval is
d̄ ± t(0.975, n − 1) · s_d / √n over the n seeds both have.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

#: t(0.975, df) for df = 1..30 (two-sided 95%)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_Z975 = 1.959964


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (a table to 30, then the Cornish-Fisher
    expansion, within 1e-3)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation of n values (sd None for one value)."""

    mean: float
    sd: float | None
    n: int


def spread(values: Sequence[float]) -> Spread:
    values = list(values)
    return Spread(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


@dataclass(frozen=True)
class PairedDifference:
    """Mean of the per-seed differences and its 95% t interval (None for one pair)."""

    mean: float
    low: float | None
    high: float | None
    n: int


def paired_difference(values: dict[int, float], reference: dict[int, float]) -> PairedDifference | None:
    """`values` − `reference` over the seeds both have; None when they share none."""
    seeds = sorted(set(values) & set(reference))
    if not seeds:
        return None
    differences = [values[seed] - reference[seed] for seed in seeds]
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return PairedDifference(mean, None, None, 1)
    half = t_quantile_975(len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences))
    return PairedDifference(mean, mean - half, mean + half, len(differences))
