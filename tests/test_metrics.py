"""Metric definitions on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bench import metrics


def test_accuracy_asr_ra():
    preds = torch.tensor([0, 0, 1, 2])
    assert metrics.accuracy(preds, torch.tensor([0, 1, 1, 2])) == 0.75
    assert metrics.attack_success_rate(preds, target=0) == 0.5
    assert metrics.robust_accuracy(preds, torch.tensor([1, 1, 1, 1])) == 0.25
    assert metrics.accuracy(torch.tensor([]), torch.tensor([])) == 0.0


def test_der_matches_backdoorbench_definition():
    assert metrics.defense_effectiveness_rating(0.9, 0.1, 0.8, 0.78) == pytest.approx((0.8 - 0.02 + 1) / 2)
    assert metrics.defense_effectiveness_rating(0.5, 0.6, 0.8, 0.9) == 0.5  # no effect either way
    assert metrics.clean_accuracy_drop(0.9, 0.85) == pytest.approx(0.05)
    assert metrics.dormancy_gap(0.99, 0.01) == pytest.approx(0.98)


@given(st.lists(st.floats(0, 1), min_size=2, max_size=10))
def test_summary_mean_and_sample_std(values):
    s = metrics.summarize(values)
    mean = sum(values) / len(values)
    assert s.n == len(values)
    assert s.mean == pytest.approx(mean)
    assert s.std == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)), abs=1e-9)


def test_summary_format():
    assert metrics.summarize([0.9]).fmt() == "90.0 (n=1)"
    assert metrics.summarize([0.9, 1.0]).fmt() == "95.0 ± 7.1 (n=2)"
    assert metrics.summarize([]).fmt() == "-"


def test_summary_by_seed_keeps_the_seeds_of_finite_values():
    s = metrics.summarize_seeds([(2, 0.5), (0, float("nan")), (1, 0.7), (3, None)])
    assert (s.n, s.seeds) == (2, (1, 2)) and s.mean == pytest.approx(0.6)
    assert s.std == pytest.approx(math.sqrt(((0.5 - 0.6) ** 2 + (0.7 - 0.6) ** 2) / 1))
    assert s.fmt() == "60.0 ± 14.1 (n=2)" and s.fmt(show_seeds=True) == "60.0 ± 14.1 (n=2: seeds 1, 2)"
    assert metrics.summarize_seeds([(4, 0.25)]).fmt(show_seeds=True) == "25.0 (n=1: seed 4)"
    empty = metrics.summarize_seeds([(0, float("nan"))])
    assert (empty.n, empty.seeds, empty.fmt()) == (0, (), "-")
