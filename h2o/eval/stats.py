"""Intervals and paired tests for every table: which differences the data supports (scipy.stats underneath).

- A solved share k / n: the Wilson score interval at 95% (`wilson`), exact enough at the small n the tasks use
  and never outside [0, 1].
- Two policies on the same cases: McNemar's exact test (`mcnemar`): a two-sided binomial test on the cases that
  one policy solved and the other did not (the discordant pairs); cases both solved or both failed say nothing
  about which is better.
- A perplexity gap closed, (PPL streaming - PPL rule) / (PPL streaming - PPL full), on one text: a paired
  percentile bootstrap over blocks of `BLOCK` consecutive tokens (`gap_closed_interval`): the same resampled blocks
  for the three runs, so what the runs share (the text) cancels and the interval reflects how the rule's gain
  varies along the text. Blocks keep the dependence between neighbouring tokens' losses.
- Two policies over several texts: the exact sign test (`sign_test`) on which one has the lower perplexity.

A difference is "supported" when its two-sided p-value is below `ALPHA`; with few cases even a large gap may not
be, and the tables say so rather than rank.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy.stats import binomtest

LEVEL = 0.95
ALPHA = 0.05
BLOCK = 64  # tokens per bootstrap block
MIN_BLOCKS = 8  # fewer blocks than this: no interval (a bootstrap over a handful of blocks says little)
RESAMPLES = 2000
SEED = 0


def wilson(k: int, n: int, level: float = LEVEL) -> tuple[float, float] | None:
    """The Wilson score interval of k successes in n trials; None when n is 0."""
    if n == 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"successes {k} must lie in [0, {n}]")
    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return max(0.0, float(ci.low)), min(1.0, float(ci.high))


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """McNemar's exact test of two policies on the same cases (a[i], b[i]: case i solved by each)."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes must have one length, got {len(a)} and {len(b)}")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    both = sum(1 for x, y in zip(a, b) if x and y)
    discordant = a_only + b_only
    p = 1.0 if discordant == 0 else float(binomtest(a_only, discordant, 0.5).pvalue)
    return {"cases": len(a), "both": both, "a_only": a_only, "b_only": b_only,
            "neither": len(a) - both - discordant, "p_value": p, "supported": p < ALPHA}


def sign_test(differences: Sequence[float]) -> dict:
    """The exact sign test: how many differences are negative (a better), positive (b better), zero (ties)."""
    a_better = sum(1 for d in differences if d < 0)
    b_better = sum(1 for d in differences if d > 0)
    n = a_better + b_better
    p = 1.0 if n == 0 else float(binomtest(a_better, n, 0.5).pvalue)
    return {"texts": len(differences), "a_better": a_better, "b_better": b_better,
            "ties": len(differences) - n, "p_value": p, "supported": p < ALPHA}


def _block_sums(losses) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(losses, dtype=np.float64).reshape(-1)
    edges = np.arange(0, len(x), BLOCK)
    return np.add.reduceat(x, edges), np.diff(np.append(edges, len(x))).astype(np.float64)


def gap_closed(rule_ppl: float, streaming_ppl: float, full_ppl: float) -> float:
    """The share of StreamingLLM's perplexity gap to the full cache that a rule closes: (PPL streaming - PPL rule) /
    (PPL streaming - PPL full); 1 is the full cache, 0 StreamingLLM, negative worse than StreamingLLM. The caller
    decides whether there is a gap to close (`gap_supported`)."""
    return (streaming_ppl - rule_ppl) / (streaming_ppl - full_ppl)


def gap_closed_interval(rule, streaming, full, level: float = LEVEL, resamples: int = RESAMPLES,
                        seed: int = SEED) -> tuple[float, float] | None:
    """The paired block-bootstrap interval of the gap closed on one text, from the three runs' per-token losses
    (the same tokens in the same order); None when the text has fewer than MIN_BLOCKS blocks or when StreamingLLM's
    gap to the full cache is not itself supported (its own interval reaches 0: no gap to close, and a ratio over
    it would mean nothing)."""
    runs = [np.asarray(x, dtype=np.float64).reshape(-1) for x in (rule, streaming, full)]
    if len({len(x) for x in runs}) != 1:
        raise ValueError(f"the three runs must score the same tokens, got {[len(x) for x in runs]}")
    (r, counts), (s, _), (f, _) = (_block_sums(x) for x in runs)
    if len(counts) < MIN_BLOCKS:
        return None
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(counts), size=(resamples, len(counts)))
    n = counts[pick].sum(1)
    ppl = [np.exp(x[pick].sum(1) / n) for x in (r, s, f)]
    gap = ppl[1] - ppl[2]
    tail = (1 - level) / 2
    if np.quantile(gap, tail) <= 0:
        return None
    ok = gap > 0
    closed = (ppl[1][ok] - ppl[0][ok]) / gap[ok]
    low, high = np.quantile(closed, [tail, 1 - tail])
    return float(low), float(high)


def gap_supported(streaming, full, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED) -> bool:
    """Whether StreamingLLM's perplexity is above the full cache's on this text by more than the block bootstrap's
    noise (the lower end of the paired interval of PPL streaming - PPL full is above 0)."""
    (s, counts), (f, _) = (_block_sums(np.asarray(x, dtype=np.float64).reshape(-1)) for x in (streaming, full))
    if len(counts) < MIN_BLOCKS:
        return float(np.exp(s.sum() / counts.sum())) > float(np.exp(f.sum() / counts.sum()))
    pick = np.random.default_rng(seed).integers(0, len(counts), size=(resamples, len(counts)))
    n = counts[pick].sum(1)
    gap = np.exp(s[pick].sum(1) / n) - np.exp(f[pick].sum(1) / n)
    return bool(np.quantile(gap, (1 - level) / 2) > 0)


def interval_text(interval: tuple[float, float] | None, percent: bool = False) -> str:
    """'[0.53, 0.98]' (or '[53%, 98%]'), '–' when there is none."""
    if interval is None or any(math.isnan(v) for v in interval):
        return "–"
    if percent:
        return f"[{interval[0]:.0%}, {interval[1]:.0%}]"
    return f"[{interval[0]:.2f}, {interval[1]:.2f}]"
