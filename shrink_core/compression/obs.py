"""GPTQ / SparseGPT: quantize and/or prune a weight column by column, feeding each column's error back into the
columns not yet processed through the inverse Hessian of the layer's calibration inputs (H = X^T X).

One routine covers GPTQ (quantize), SparseGPT (adaptive mask, optional quantization) and GPTQ on a fixed mask
(Wanda or magnitude mask first, then quantize). With `act_order`, columns are visited by decreasing H_jj while the
group parameters stay those of the original contiguous groups ("static groups"), so the packed format is unchanged.
Pure: tensors in, tensors out.
"""
from __future__ import annotations

import torch

from shrink_core.compression.primitives import chunk_rows, scale_zero, to_groups

CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def _damped(hessian: torch.Tensor, damp: float):
    """Damp a float32 H in place, more each time: yields (lam, dead) per attempt, lam = damp * 10^k * mean(diag H),
    with dead input features (zero diagonal) set to 1 first. The callers factorize and stop at the first success."""
    diagonal = hessian.diagonal()  # a view: damping adds to it in place
    dead = diagonal == 0
    diagonal[dead] = 1
    undamped = diagonal.clone()
    mean_diag = undamped.mean()
    for attempt in range(6):
        lam = damp * (10**attempt) * mean_diag
        diagonal.copy_(undamped + lam)
        yield lam, dead
    raise ValueError("the calibration Hessian is not positive definite even after damping")


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = 0.01,
                           overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of H^-1 (in, in) after damping; also the mask of dead input features (in,).

    Memory: an (in, in) float32 matrix is 822 MB for Llama-3-8B's down_proj, so two live here at once beside the
    caller's: the damped H and one more, in which the factor, H^-1 and its upper factor are computed in place (LAPACK
    works in place; the results are the same bits). `overwrite` damps the caller's own float32 H in place."""
    hessian = hessian.float() if overwrite else hessian.float().clone()
    status = torch.empty((), dtype=torch.int32, device=hessian.device)
    work = None
    for _, dead in _damped(hessian, damp):
        work, info = torch.linalg.cholesky_ex(hessian, out=(work, status) if work is not None else None)
        if info == 0:
            torch.cholesky_inverse(work, out=work)
            torch.linalg.cholesky_ex(work, upper=True, out=(work, status))
            if status == 0:
                return work, dead


def _permute_(matrix: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """matrix[order][:, order], in place: rows moved along the permutation's cycles through one row of scratch, then
    each block of rows gathered along the columns. An 8B down_proj's H is 822 MB of float32; a permuted copy would be
    one more. Moves only: the values are the same bits."""
    targets = order.tolist()
    scratch, seen = torch.empty_like(matrix[0]), [False] * len(targets)
    for start in range(len(targets)):
        if seen[start] or targets[start] == start:
            continue
        scratch.copy_(matrix[start])
        row = start
        while targets[row] != start:  # row takes the old row targets[row], which is not overwritten yet
            seen[row] = True
            matrix[row].copy_(matrix[targets[row]])
            row = targets[row]
        seen[row] = True
        matrix[row].copy_(scratch)
    rows = chunk_rows(matrix.shape[1], matrix.element_size())
    for begin in range(0, matrix.shape[0], rows):
        matrix[begin:begin + rows] = matrix[begin:begin + rows].index_select(1, order)
    return matrix


def clip_search(weight: torch.Tensor, importance: torch.Tensor, bits: int, group_size: int | None,
                symmetric: bool, scales: str = "fp16") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale and zero (out, groups) whose clip ratio minimises the importance-weighted squared error.

    importance (in,) is the diagonal of H (activation energy per input feature): an activation-aware range search.
    Rows are searched a block at a time (`chunk_rows` of float32): their groups are independent, and a whole
    stacked gate + up of an 8B model would hold several float32 copies of 470 MB at once.
    """
    rows = chunk_rows(weight.shape[1])
    weights = to_groups(importance.float().reshape(1, -1), group_size)  # (1, groups, size): padding weighs 0
    found, zeros = [], []
    for start in range(0, weight.shape[0], rows):
        part = weight[start:start + rows].float()
        grouped = to_groups(part, group_size)  # (rows, groups, size), partial last group zero-padded
        best_error = best_scale = best_zero = best_ratio = None
        for ratio in CLIP_RATIOS:
            scale, zero = scale_zero(part, bits, group_size, symmetric, clip=ratio, scales=scales)  # (rows, groups)
            codes = torch.round(grouped / scale.unsqueeze(-1) + zero.unsqueeze(-1)).clamp(0, 2**bits - 1)
            error = ((codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1) - grouped).pow(2).mul(weights).sum(-1)
            del codes
            if best_error is None:
                best_error, best_scale, best_zero = error, scale, zero
                best_ratio = torch.full_like(error, ratio)
            else:
                better = error < best_error
                best_error = torch.where(better, error, best_error)
                best_scale = torch.where(better, scale, best_scale)
                best_zero = torch.where(better, zero, best_zero)
                best_ratio = torch.where(better, ratio, best_ratio)
        if scales == "log8":  # each ratio's levels sat below its own row top: store the chosen ones under theirs
            best_scale, best_zero = scale_zero(part, bits, group_size, symmetric, clip=best_ratio, scales=scales)
        found.append(best_scale)
        zeros.append(best_zero)
    return torch.cat(found), torch.cat(zeros)


def obs_compress(
    weight: torch.Tensor,  # (out, in)
    hessian: torch.Tensor,  # (in, in)
    *,
    bits: int | None = None,
    group_size: int | None = None,
    symmetric: bool = False,
    scale: torch.Tensor | None = None,  # static group parameters (out, groups); default: min/max of the weight
    zero: torch.Tensor | None = None,
    act_order: bool = False,
    sparsity: float | None = None,  # SparseGPT adaptive unstructured mask
    nm: tuple[int, int] | None = None,  # SparseGPT adaptive N:M mask
    mask: torch.Tensor | None = None,  # fixed keep-mask (out, in), e.g. from Wanda
    codebook: torch.Tensor | None = None,  # (out, levels): each row's values, rounded to its nearest (bits None)
    scales: str = "fp16",  # how the default group scales are stored (formats.SCALE_FORMATS)
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Returns (new weight (out, in), scale (out, groups) or None, zero (out, groups) or None, keep-mask (out, in))."""
    rows, columns = weight.shape
    # a keep-mask only where something masks: for plain GPTQ it would be one more (out, in) tensor for nothing
    masking = mask is not None or sparsity is not None or nm is not None
    keep = None if not masking else torch.ones_like(weight, dtype=torch.bool) if mask is None else mask.clone()
    if bits is not None and scale is None:
        plain = weight.detach().float()
        scale, zero = scale_zero(plain if keep is None else plain * keep, bits, group_size, symmetric, scales=scales)
    size = group_size or columns
    order = torch.argsort(torch.diag(hessian), descending=True) if act_order and nm is None else None
    if order is not None:
        W, keep = weight.detach().float()[:, order], None if keep is None else keep[:, order]
    else:
        W = weight.detach().float().clone()
    # H is permuted and damped in place and put back afterwards, bit for bit, so the caller's H is the only (in, in)
    # matrix here beside the factor's (the caller may reuse it for another stack reading the same input)
    H = hessian if hessian.dtype == torch.float32 else hessian.float()
    borrowed, diagonal = H is hessian, H.diagonal().clone()
    try:
        if order is not None:
            _permute_(H, order)
        hinv, dead = inverse_hessian_factor(H, damp, overwrite=True)
    finally:
        if borrowed:
            if order is not None:
                _permute_(H, torch.argsort(order))
            H.diagonal().copy_(diagonal)
    del H, hessian
    W[:, dead] = 0
    # (in,) original group per column; a partial last group (in % size columns) is in // size, as in `to_groups`
    group_of = (order if order is not None else torch.arange(columns)) // size
    top = 2**bits - 1 if bits else 0
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        W1, hinv1 = W[:, start:end].clone(), hinv[start:end, start:end]
        errors = torch.zeros_like(W1)
        diag = torch.diag(hinv1)  # (count,)
        if sparsity is not None:  # drop exactly round(share * weights) of the block, the least salient
            saliency = W1.pow(2) / diag.pow(2).unsqueeze(0)  # (out, count)
            block_keep = torch.ones(saliency.numel(), dtype=torch.bool, device=W.device)
            drop = int(round(saliency.numel() * sparsity))
            if drop:
                block_keep[torch.topk(saliency.flatten(), drop, largest=False).indices] = False
            keep[:, start:end] = block_keep.reshape(saliency.shape)
        for i in range(end - start):
            column = start + i
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                saliency = W1[:, i:i + m].pow(2) / diag[i:i + m].pow(2).unsqueeze(0)  # (out, m)
                keep_block = torch.zeros_like(saliency, dtype=torch.bool)
                keep_block.scatter_(1, torch.topk(saliency, n, dim=1).indices, True)
                keep[:, column:column + m] = keep_block
            w = W1[:, i]
            if codebook is not None:
                q = codebook.gather(1, (w.unsqueeze(1) - codebook).abs().argmin(1, keepdim=True)).squeeze(1)
            elif bits is None:
                q = w.clone() if keep is None else w * keep[:, column]
            else:
                g = int(group_of[column])
                s, z = scale[:, g], zero[:, g]
                q = w.div(s).add_(z).round_().clamp_(0, top).sub_(z).mul_(s)
                if keep is not None:
                    q.mul_(keep[:, column])
            error = (w - q).div_(diag[i])
            W1[:, i:].addr_(error, hinv1[i, i:], alpha=-1)
            W1[:, i] = q
            errors[:, i] = error
        W[:, start:end] = W1
        W[:, end:].addmm_(errors, hinv[start:end, end:], alpha=-1)
    if order is not None:
        inverse = torch.argsort(order)
        W, keep = W[:, inverse], None if keep is None else keep[:, inverse]
    return W, scale, zero, torch.ones_like(W, dtype=torch.bool) if keep is None else keep


def output_target(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The weight (out, in) whose outputs on the compressed model's inputs X best match the full-precision layer's
    outputs on the full-precision inputs X_fp: argmin_V ||X_fp W^T - X V^T||^2 + lam ||V - W||^2, i.e.
    V^T = (H + lam I)^-1 (C + lam I) W^T with H = X^T X and C = X^T X_fp (in, in), lam GPTQ's damping. GPTQ on this
    target under H then minimises the error against the full-precision model rather than against the layer's own,
    already perturbed, inputs: error carried in from earlier layers is corrected where the weights can absorb it.
    The ridge pulls towards W (not 0), so poorly covered directions keep the original weights; X = X_fp gives W."""
    hessian = hessian.float().clone()
    weight_t = weight.float().T  # (in, out)
    for lam, dead in _damped(hessian, damp):
        factor, info = torch.linalg.cholesky_ex(hessian)
        if info == 0:
            target = torch.cholesky_solve(cross.float() @ weight_t + lam * weight_t, factor).T  # (out, in)
            target[:, dead] = 0
            return target.contiguous()
