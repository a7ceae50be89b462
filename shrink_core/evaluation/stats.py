"""Pure statistics over per-item records: perplexity, bits per byte, bootstrap intervals, paired tests.

Items (rows, documents, questions) are the unit of resampling: tokens within an item are not independent.
"""
from __future__ import annotations

import math

import numpy as np

BOOTSTRAP_SAMPLES = 1000
SEED = 1234  # fixed, so the same records always give the same interval


def perplexity(nll_sum: np.ndarray, tokens: np.ndarray) -> float:
    """Token-weighted perplexity over items: exp(total NLL / total tokens)."""
    return float(math.exp(nll_sum.sum() / max(tokens.sum(), 1)))


def bits_per_byte(nll_sum: np.ndarray, nbytes: np.ndarray) -> float:
    """Total NLL in bits over UTF-8 bytes: comparable across tokenizers."""
    return float(nll_sum.sum() / math.log(2) / max(nbytes.sum(), 1))


def _resample_index(n: int, samples: int = BOOTSTRAP_SAMPLES) -> np.ndarray:
    rng = np.random.default_rng(SEED)
    return rng.integers(0, n, size=(samples, n))  # (samples, n)


def bootstrap_ratio_ci(numerator: np.ndarray, denominator: np.ndarray, transform=lambda x: x,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of transform(sum(num)/sum(den)) under resampling of items."""
    n = len(numerator)
    if n < 2:
        value = transform(numerator.sum() / max(denominator.sum(), 1e-12))
        return (float(value), float(value))
    index = _resample_index(n)
    ratios = numerator[index].sum(axis=1) / np.maximum(denominator[index].sum(axis=1), 1e-12)
    values = transform(ratios)
    tail = (1 - level) / 2 * 100
    return (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))


def ppl_ci(nll_sum: np.ndarray, tokens: np.ndarray) -> tuple[float, float]:
    return bootstrap_ratio_ci(nll_sum, tokens.astype(float), transform=np.exp)


def accuracy_ci(correct: np.ndarray) -> tuple[float, float]:
    return bootstrap_ratio_ci(correct.astype(float), np.ones(len(correct)))


def paired_bootstrap_p(a: np.ndarray, b: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Two-sided p-value that the (weighted) mean of per-item a - b is zero.

    Resamples the centred differences (the null), so it stays valid for skewed per-item losses.
    """
    diff = a - b
    w = np.ones(len(diff)) if weights is None else weights.astype(float)
    n = len(diff)
    if n < 2:
        return 1.0
    observed = (diff * w).sum() / w.sum()
    centred = diff - observed
    index = _resample_index(n, 2000)
    null = (centred[index] * w[index]).sum(axis=1) / w[index].sum(axis=1)
    return float((np.abs(null) >= abs(observed)).mean())


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
