"""Paired comparisons: pretrained minus baseline over seeds, with a t confidence interval.

Every comparison byol3d reports (dense probe, fine-tuning, global probe) runs the pretrained
encoder and its baseline (random initialisation of the same architecture) on the *same*
labelled volumes for each seed, so the per-seed differences are paired: their mean and its
95% confidence interval (Student's t with ``n - 1`` degrees of freedom) say whether the
pretrained encoder is ahead by more than the seed-to-seed variation.

>>> s = paired_difference([0.60, 0.55, 0.62], [0.52, 0.48, 0.55])
>>> round(s.mean_difference, 3), s.n
(0.073, 3)
>>> s.excludes_zero
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import stats

__all__ = ["PairedDifference", "dice_per_label", "paired_difference"]


@dataclass(frozen=True)
class PairedDifference:
    """Summary of ``a - b`` over paired seeds.

    Attributes:
        n: number of pairs.
        mean_a, mean_b: means of the two sides.
        mean_difference: mean of the per-seed differences ``a_i - b_i``.
        sd_difference: their sample standard deviation (``ddof=1``; 0 for one pair).
        ci_low, ci_high: the ``confidence`` interval of the mean difference (t distribution);
            NaN with fewer than 2 pairs.
        confidence: the interval's level (0.95 by default).
    """

    n: int
    mean_a: float
    mean_b: float
    mean_difference: float
    sd_difference: float
    ci_low: float
    ci_high: float
    confidence: float

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of zero."""
        return bool(self.ci_low > 0 or self.ci_high < 0)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def format(self, digits: int = 3) -> str:
        """``+0.047 [+0.009, +0.086]`` (mean difference and its interval)."""
        f = f"{{:+.{digits}f}}"
        if math.isnan(self.ci_low):
            return f.format(self.mean_difference) + " (1 seed: no CI)"
        return (
            f"{f.format(self.mean_difference)} [{f.format(self.ci_low)}, {f.format(self.ci_high)}]"
        )


def paired_difference(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> PairedDifference:
    """Mean of ``a_i - b_i`` with a two-sided t confidence interval.

    Args:
        a: per-seed scores of the pretrained side.
        b: per-seed scores of the baseline, in the same seed order.
        confidence: level of the interval, in (0, 1).

    Raises:
        ValueError: different lengths, no pairs, a level outside (0, 1), or non-finite scores.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(
            f"a and b must be equally long, non-empty lists of paired scores, got {x.shape} and {y.shape}"
        )
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("scores must be finite")
    d = x - y
    n = int(d.size)
    mean = float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    if n > 1:
        half = float(stats.t.ppf(0.5 + confidence / 2.0, n - 1)) * sd / math.sqrt(n)
        low, high = mean - half, mean + half
    else:
        low = high = float("nan")
    return PairedDifference(
        n=n,
        mean_a=float(x.mean()),
        mean_b=float(y.mean()),
        mean_difference=mean,
        sd_difference=sd,
        ci_low=low,
        ci_high=high,
        confidence=confidence,
    )


def labelled_sets(pool: Sequence[int], n: int, seeds: int) -> list[list[int]]:
    """The labelled training sets of ``seeds`` paired draws of ``n`` volumes from ``pool``.

    Every protocol (dense probe, fine-tuning) uses these, so seed ``s`` trains on the same
    volumes everywhere. Sets are taken as consecutive, disjoint chunks of one seeded
    permutation of ``pool`` while the pool lasts, then of further permutations, and a set
    equal to an earlier one is drawn again (as long as ``pool`` holds that many distinct
    sets): two seeds training on the same volumes would count one pair twice and narrow the
    confidence interval without new evidence.

    >>> labelled_sets(range(10), 3, 3)
    [[4, 6, 7], [1, 5, 9], [0, 2, 3]]

    Raises:
        ValueError: ``n`` outside ``1..len(pool)`` or ``seeds < 1``.
    """
    pool = [int(i) for i in pool]
    if not 1 <= n <= len(pool) or seeds < 1:
        raise ValueError(f"cannot draw {seeds} sets of {n} volumes from a pool of {len(pool)}")
    rng = np.random.default_rng([n, len(pool)])
    distinct = math.comb(len(pool), n)
    sets: list[list[int]] = []
    order: list[int] = []
    while len(sets) < seeds:
        if len(order) < n:
            order = [pool[i] for i in rng.permutation(len(pool))]
        chosen, order = sorted(order[:n]), order[n:]
        if chosen not in sets or len(sets) >= distinct:
            sets.append(chosen)
    return sets


def dice_per_label(pred: torch.Tensor, truth: torch.Tensor, n_labels: int) -> np.ndarray:
    """Dice ``2|P & T| / (|P| + |T|)`` of each foreground label ``1..n_labels-1``.

    NaN for a label absent from both the prediction and the truth (it says nothing of the
    encoder), so ``np.nanmean`` over labels and volumes skips it.

    >>> dice_per_label(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 4).round(3).tolist()
    [0.667, 0.667, nan]
    """
    out = np.full(n_labels - 1, np.nan)
    for c in range(1, n_labels):
        p, t = pred == c, truth == c
        denom = int(p.sum() + t.sum())
        if denom:
            out[c - 1] = 2.0 * int((p & t).sum()) / denom
    return out
