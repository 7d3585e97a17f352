"""Intervals and paired tests (h2o.eval.stats): known values, the properties every interval must have, and the
gap-closed bootstrap on losses whose answer is known."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from h2o.eval import stats


def test_wilson_matches_its_closed_form():
    for k, n in [(0, 10), (5, 10), (9, 10), (1, 3), (30, 30)]:
        z = 1.959963984540054
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        low, high = stats.wilson(k, n)
        assert (low, high) == pytest.approx((max(0, centre - half), min(1, centre + half)), abs=1e-9)
    assert stats.wilson(0, 0) is None
    with pytest.raises(ValueError, match="must lie in"):
        stats.wilson(4, 3)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 400).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_a_wilson_interval_holds_its_share_inside_zero_one_and_narrows_with_more_cases(kn):
    k, n = kn
    low, high = stats.wilson(k, n)
    assert 0 <= low <= k / n <= high <= 1
    low4, high4 = stats.wilson(4 * k, 4 * n)
    assert high4 - low4 < high - low


def test_mcnemar_counts_only_the_discordant_cases():
    a = [True] * 6 + [True] * 3 + [False] * 2
    b = [False] * 6 + [True] * 3 + [False] * 2
    test = stats.mcnemar(a, b)
    assert (test["both"], test["a_only"], test["b_only"], test["neither"]) == (3, 6, 0, 2)
    assert test["p_value"] == pytest.approx(2 * 0.5 ** 6) and test["supported"]
    same = stats.mcnemar([True, False, True], [True, False, True])
    assert same["p_value"] == 1.0 and not same["supported"]
    # 2 of 8 against 1 of 8, one case apart: not a ranking
    close = stats.mcnemar([True, True] + [False] * 6, [True] + [False] * 7)
    assert close["p_value"] == 1.0 and not close["supported"]
    with pytest.raises(ValueError, match="one length"):
        stats.mcnemar([True], [True, False])


def test_the_sign_test_over_texts():
    test = stats.sign_test([-1.0, -0.5, -2.0, -0.1, -0.3, -0.2])
    assert (test["a_better"], test["b_better"], test["ties"]) == (6, 0, 0)
    assert test["p_value"] == pytest.approx(2 * 0.5 ** 6) and test["supported"]
    mixed = stats.sign_test([-1.0, 1.0, 0.0, -0.2])
    assert (mixed["a_better"], mixed["b_better"], mixed["ties"]) == (2, 1, 1) and not mixed["supported"]


def _losses(seed, n=1024):
    return np.random.default_rng(seed).gamma(2.0, 1.5, n)


def test_gap_closed_interval_is_one_for_the_full_cache_zero_for_streaming_and_holds_the_estimate():
    full = _losses(0)
    streaming = full + np.abs(_losses(1)) * 0.5
    assert stats.gap_closed_interval(full, streaming, full) == pytest.approx((1.0, 1.0))
    assert stats.gap_closed_interval(streaming, streaming, full) == pytest.approx((0.0, 0.0))
    rule = full + (streaming - full) * np.random.default_rng(2).uniform(0.2, 0.6, len(full))
    ppl = [math.exp(np.mean(x)) for x in (rule, streaming, full)]
    estimate = (ppl[1] - ppl[0]) / (ppl[1] - ppl[2])
    low, high = stats.gap_closed_interval(rule, streaming, full)
    assert low < estimate < high and 0 < low and high < 1
    # a rule whose gain is the same everywhere is known more tightly than one whose gain is noisy
    steady = full + (streaming - full) * 0.4
    low_s, high_s = stats.gap_closed_interval(steady, streaming, full)
    assert high_s - low_s < high - low


def test_gap_closed_interval_refuses_runs_of_other_tokens_and_needs_two_blocks():
    with pytest.raises(ValueError, match="same tokens"):
        stats.gap_closed_interval(_losses(0, 128), _losses(1, 128), _losses(2, 64))
    short = _losses(0, stats.BLOCK)
    assert stats.gap_closed_interval(short, short + 1, short) is None
    assert stats.gap_closed_interval(_losses(0), _losses(0), _losses(0)) is None  # no gap to close


def test_interval_text():
    assert stats.interval_text((0.1234, 0.9)) == "[0.12, 0.90]"
    assert stats.interval_text((0.1234, 0.9), percent=True) == "[12%, 90%]"
    assert stats.interval_text(None) == "–"


def test_a_gap_within_the_bootstrap_noise_is_no_gap_to_close():
    full = _losses(0)
    assert stats.gap_supported(full + 0.3, full)
    assert not stats.gap_supported(full, full)
    noise = np.random.default_rng(3).normal(0, 1.0, len(full))
    wobble = full + noise - noise.mean() + 1e-3  # above the full cache on average, by far less than its noise
    assert not stats.gap_supported(wobble, full)
    rule = full + 0.1
    assert stats.gap_closed_interval(rule, wobble, full) is None  # a ratio over no gap would mean nothing
    few = _losses(0, stats.BLOCK * (stats.MIN_BLOCKS - 1))
    assert stats.gap_closed_interval(few + 0.05, few + 0.3, few) is None
