from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from byol3d.evaluation.stats import dice_per_label, labelled_sets, paired_difference


def test_paired_interval_matches_the_t_formula():
    a, b = [0.61, 0.55, 0.60, 0.58], [0.50, 0.52, 0.49, 0.55]
    s = paired_difference(a, b)
    d = np.subtract(a, b)
    # t(0.975, 3) = 3.182446 (tables)
    half = 3.182446 * d.std(ddof=1) / math.sqrt(4)
    assert s.n == 4 and s.mean_difference == pytest.approx(d.mean())
    assert (s.ci_low, s.ci_high) == pytest.approx((d.mean() - half, d.mean() + half), abs=1e-6)
    assert s.mean_a == pytest.approx(np.mean(a)) and s.mean_b == pytest.approx(np.mean(b))
    assert not s.excludes_zero  # -0.003 .. +0.143


def test_pairing_is_what_makes_a_consistent_small_lead_significant():
    base = np.array([0.2, 0.5, 0.8, 0.35, 0.65])  # seeds differ a lot
    lead = base + np.array([0.01, 0.012, 0.009, 0.011, 0.01])
    s = paired_difference(lead, base)
    assert s.excludes_zero and s.ci_low > 0
    # shuffled pairs: the same values, no longer paired, and the interval spans zero
    assert not paired_difference(lead, base[[2, 4, 0, 1, 3]]).excludes_zero


def test_one_pair_has_no_interval_and_bad_input_is_refused():
    s = paired_difference([0.5], [0.4])
    assert math.isnan(s.ci_low) and not s.excludes_zero and "no CI" in s.format()
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([0.5, 0.6], [0.4])
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([0.5], [0.4], confidence=1.5)
    with pytest.raises(ValueError, match="finite"):
        paired_difference([float("nan")], [0.4])


def test_dice_counts_overlap_and_skips_absent_labels():
    truth = torch.tensor([0, 1, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 2, 2, 0])
    dice = dice_per_label(pred, truth, n_labels=4)
    assert dice[0] == pytest.approx(2 * 2 / 5) and dice[1] == pytest.approx(2 * 1 / 4)
    assert math.isnan(dice[2])


def test_labelled_sets_are_disjoint_while_the_pool_lasts_then_distinct():
    sets = labelled_sets(range(18), 3, 5)
    flat = [i for s in sets for i in s]
    assert all(len(s) == 3 and s == sorted(s) for s in sets)
    assert len(set(flat)) == 15 and set(flat) <= set(range(18))  # 5 x 3 <= 18: disjoint
    assert sets == labelled_sets(range(18), 3, 5)  # the same draws for every protocol
    more = labelled_sets(range(18), 6, 5)  # 30 > 18 volumes: overlapping, never identical
    assert len({tuple(s) for s in more}) == 5
    ones = labelled_sets(range(4), 1, 6)  # only 4 distinct sets: repeats only past that
    assert sorted(map(tuple, ones[:4])) == [(0,), (1,), (2,), (3,)] and len(ones) == 6
    assert labelled_sets([7, 9], 2, 2) == [[7, 9], [7, 9]]


def test_labelled_sets_refuse_impossible_draws():
    with pytest.raises(ValueError, match="pool of 3"):
        labelled_sets(range(3), 4, 1)
    with pytest.raises(ValueError):
        labelled_sets(range(3), 1, 0)
