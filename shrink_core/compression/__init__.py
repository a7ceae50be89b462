"""Applying a plan: quantization math (RTN, GPTQ), pruning (masks and structures), and the exports users deploy."""
