"""Does shrinking GPTQ's statistics towards their diagonals help the languages outside the calibration mix?

  python bench/bench_shrinkage.py --shrink 0.1 [bench_peers.py arguments ...]

GPTQ (and gptq-seq) spend each column's rounding error along the calibration inputs' covariance H = X^T X (and, for
gptq-seq, the cross term C = X^T X_fp). A language absent from the mix (Hindi) has other input directions, so a
solution tuned to the mix's off-diagonal structure can move its outputs the wrong way; llama.cpp's imatrix reads only
diag(H) and is better on Hindi at 3 bits (docs/methods.md). This runs `bench_peers.py` unchanged with every 2-D H and
C the engine hands to the compressor replaced by (1 - a) M + a diag(M) (a = --shrink; 0 is GPTQ as shipped, 1 keeps
only the diagonals). The rest (clip search on diag(H), damping, act-order) is the engine's own. An experiment, not an
engine option: it becomes one only if a value helps the languages outside the mix without costing the others.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def shrunk(matrix, amount: float):
    """(1 - amount) M + amount diag(M), a new tensor (the engine damps its own H in place)."""
    import torch

    return (1 - amount) * matrix + amount * torch.diag(torch.diagonal(matrix))


def main() -> None:
    argv = sys.argv[1:]
    if "--shrink" not in argv:
        raise SystemExit("give --shrink A (0 <= A <= 1): the share of each statistic's off-diagonal part removed.")
    at = argv.index("--shrink")
    amount = float(argv[at + 1])
    if not 0 <= amount <= 1:
        raise SystemExit(f"--shrink must be between 0 and 1, not {amount}.")
    del argv[at:at + 2]

    from shrink_core.compression import apply

    original = apply._compress_weight

    def compress(weight, row, hessian, cross=None):
        if hessian is not None and hessian.dim() == 2:
            hessian = shrunk(hessian, amount)
            cross = None if cross is None else shrunk(cross, amount)
        return original(weight, row, hessian, cross)

    apply._compress_weight = compress
    print(f'{{"part": "shrinkage", "shrink": {amount}}}', flush=True)
    import bench_peers

    sys.argv = ["bench_peers.py", *argv]
    bench_peers.main()


if __name__ == "__main__":
    main()
