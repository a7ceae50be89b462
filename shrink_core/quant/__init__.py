"""Quantization: pure math (`primitives`), GPTQ/SparseGPT (`obs`), calibration plumbing, and `apply`, the only
place that changes a model for a plan."""
