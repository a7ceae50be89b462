"""Pure statistics over per-item records: perplexity, bits per byte, bootstrap intervals, paired tests.

Items (rows, documents, questions) are the unit of resampling: tokens within an item are not independent.

Three rules keep these numbers honest:
- no interval below MIN_INTERVAL_ITEMS items (the functions return None, and `interval_note` says why);
- a resampling p-value is (1 + #null at least as extreme) / (B + 1), so it is never 0 (at least 1/(B+1));
- when several slices are tested, `holm_adjust` corrects the p-values across them (Holm-Bonferroni).
"""
from __future__ import annotations

import math

import numpy as np

ALPHA = 0.05  # "significant": a (Holm-adjusted, where several slices are tested) p-value below this
BOOTSTRAP_SAMPLES = 1000
PAIRED_TEST_SAMPLES = 2000  # resamples behind paired_bootstrap_p: its smallest p-value is 1 / 2001
SEED = 1234  # fixed, so the same records always give the same interval
# The fewest items (the unit the bootstrap resamples: text rows or documents for perplexity, questions for accuracy)
# that get an interval. Below it a percentile bootstrap has too few distinct resamples to find its tails: on 19 items
# one item moves an accuracy by more than 5 points, and 3 right answers out of 3 resample to the interval [1, 1].
MIN_INTERVAL_ITEMS = 20


def perplexity(nll_sum: np.ndarray, tokens: np.ndarray) -> float:
    """Token-weighted perplexity over items: exp(total NLL / total tokens)."""
    return float(math.exp(nll_sum.sum() / max(tokens.sum(), 1)))


def bits_per_byte(nll_sum: np.ndarray, nbytes: np.ndarray) -> float:
    """Total NLL in bits over UTF-8 bytes: comparable across tokenizers."""
    return float(nll_sum.sum() / math.log(2) / max(nbytes.sum(), 1))


def _resample_index(n: int, samples: int = BOOTSTRAP_SAMPLES) -> np.ndarray:
    rng = np.random.default_rng(SEED)
    return rng.integers(0, n, size=(samples, n))  # (samples, n)


def interval_note(items: int) -> str | None:
    """Why there is no interval over `items` items ("n=3 items: too few for an interval"), or None when there is one."""
    if items >= MIN_INTERVAL_ITEMS:
        return None
    return f"n={items} item{'' if items == 1 else 's'}: too few for an interval (fewer than {MIN_INTERVAL_ITEMS})"


def format_interval(interval, items: int, digits: int = 3) -> str:
    """"[low, high]" for display, or the reason there is none (also for an interval stored over too few items)."""
    if interval_note(items) or interval is None or interval[0] is None:
        return interval_note(items) or "no interval recorded"
    return f"[{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def bootstrap_ratio_ci(numerator: np.ndarray, denominator: np.ndarray, transform=lambda x: x,
                       level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of transform(sum(num)/sum(den)) under resampling of items; None below MIN_INTERVAL_ITEMS
    items (see `interval_note`)."""
    n = len(numerator)
    if n < MIN_INTERVAL_ITEMS:
        return None
    index = _resample_index(n)
    ratios = numerator[index].sum(axis=1) / np.maximum(denominator[index].sum(axis=1), 1e-12)
    values = transform(ratios)
    tail = (1 - level) / 2 * 100
    return (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))


def ppl_ci(nll_sum: np.ndarray, tokens: np.ndarray) -> tuple[float, float] | None:
    return bootstrap_ratio_ci(nll_sum, tokens.astype(float), transform=np.exp)


def accuracy_ci(correct: np.ndarray) -> tuple[float, float] | None:
    return bootstrap_ratio_ci(correct.astype(float), np.ones(len(correct)))


def paired_bootstrap_p(a: np.ndarray, b: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Two-sided p-value that the (weighted) mean of per-item a - b is zero.

    Resamples the centred differences (the null), so it stays valid for skewed per-item losses. The p-value counts
    the observed statistic as one of the null draws, (1 + k) / (B + 1), so it is never 0: B resamples cannot show a
    p-value below 1 / (B + 1).
    """
    diff = a - b
    w = np.ones(len(diff)) if weights is None else weights.astype(float)
    n = len(diff)
    if n < 2:
        return 1.0
    observed = (diff * w).sum() / w.sum()
    centred = diff - observed
    index = _resample_index(n, PAIRED_TEST_SAMPLES)
    null = (centred[index] * w[index]).sum(axis=1) / w[index].sum(axis=1)
    extreme = int((np.abs(null) >= abs(observed)).sum())
    return (1 + extreme) / (PAIRED_TEST_SAMPLES + 1)


def mcnemar_p(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Exact two-sided McNemar test on discordant items (answers that flipped one way or the other)."""
    from scipy.stats import binomtest

    a_only = int(np.sum(correct_a & ~correct_b))
    b_only = int(np.sum(~correct_a & correct_b))
    if a_only + b_only == 0:
        return 1.0
    return float(binomtest(a_only, a_only + b_only, 0.5).pvalue)


def flips(correct_ref: np.ndarray, correct_cand: np.ndarray) -> dict:
    """Items whose correctness changed against the reference, both ways."""
    return {
        "lost": int(np.sum(correct_ref & ~correct_cand)),
        "gained": int(np.sum(~correct_ref & correct_cand)),
        "total": int(np.sum(correct_ref != correct_cand)),
    }


def holm_adjust(pvalues: list[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values, in the input order; None (no test) stays None and does not count.

    With m tests sorted ascending, the i-th smallest (from 0) becomes max over j <= i of min(1, (m - j) p_(j)):
    rejecting where the adjusted p < alpha keeps the chance of any false "significant" among the m below alpha.
    """
    present = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(present)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out
