"""Budgets, hard top-k and the differentiable (soft) top-k.

All functions take scores ``[B, N]`` with an optional boolean ``mask`` ``[B, N]``
marking the valid entries of padded rows. A row's budget ``k`` counts valid
entries only.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction

import torch

__all__ = [
    "validate_retention",
    "validate_loss_weight",
    "token_budget",
    "hard_topk",
    "soft_topk",
]

# Denominators below this keep the budget's integer arithmetic inside int64 for every
# count: (N mod q) * p < q * q <= 2**62 (see token_budget).
_TENSOR_DENOMINATOR_LIMIT = 2**31


def _shortest_decimal(value: float, same) -> float:
    """The shortest decimal that ``same`` maps back to ``value``: a float32 ``0.29`` is
    0.28999999165534973 as a double, but it was written, and is meant, as 0.29."""
    for digits in range(1, 18):
        candidate = float(f"{value:.{digits}g}")
        if same(candidate):
            return candidate
    return value


def _plain_number(value):
    """``value`` as a Python number if it is one: a number, a NumPy scalar or a 0-d tensor or
    array (floats narrower than float64 as the decimal they were written as); else ``value``."""
    if isinstance(value, (str, bytes)) or getattr(value, "ndim", None) != 0 or not hasattr(value, "item"):
        return value
    number = value.item()
    dtype = getattr(value, "dtype", None)
    if isinstance(number, float) and math.isfinite(number):
        if torch.is_tensor(value) and dtype != torch.float64:
            return _shortest_decimal(number, lambda c: torch.tensor(c, dtype=dtype).item() == number)
        if not torch.is_tensor(value) and getattr(dtype, "itemsize", 8) < 8:  # NumPy float16 / float32
            return _shortest_decimal(number, lambda c: dtype.type(c).item() == number)
    return number


def _described(value) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None and not isinstance(value, (str, bytes)) and len(shape) > 0:
        return f"{type(value).__name__} of shape {tuple(shape)} (give one number)"
    return repr(value)


def validate_retention(retention: float) -> float:
    """Return ``retention`` as a float, or raise ``ValueError`` unless it lies in (0, 1].

    Python numbers, NumPy scalars and 0-d tensors are accepted (a float32 ``0.3`` reads as
    0.3); bools, strings and tensors or arrays of several values are not.
    """
    number = _plain_number(retention)
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        raise ValueError(f"retention must be a number in (0, 1], got {_described(retention)}")
    retention = float(number)
    if math.isnan(retention) or not 0.0 < retention <= 1.0:
        raise ValueError(f"retention must be in (0, 1] (the fraction of visual tokens kept), got {retention}")
    return retention


def validate_loss_weight(value) -> float:
    """Return the selection loss weight ``value`` as a float, or raise ``ValueError`` unless it is
    a finite number >= 0 (Python numbers, NumPy scalars and 0-d tensors; not bools)."""
    number = _plain_number(value)
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        raise ValueError(f"selection_loss_weight must be a finite number >= 0, got {_described(value)}")
    try:
        weight = float(number)
    except OverflowError:  # an int too large for a float
        weight = math.inf
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"selection_loss_weight must be a finite number >= 0 (the weight of the selection loss "
                         f"added to the language loss), got {weight}")
    return weight


def token_budget(retention: float, counts: torch.Tensor) -> torch.Tensor:
    """Per-sample budget ``k = max(1, floor(retention * N))``; 0 where ``N == 0``.

    ``retention`` is read as the decimal it was written as (the shortest ``repr`` of the
    float, so ``0.29`` is 29/100, not the double just below it) and the floor is taken
    exactly in integers: ``0.29 * 100`` gives 29 although the float product is
    28.999999999999996, and ``0.99999995 * 10`` gives 9.

    Args:
        retention: fraction of visual tokens kept, in (0, 1].
        counts: ``LongTensor[B]``, the number ``N`` of visual tokens of each sample.

    Returns:
        ``LongTensor[B]`` on ``counts.device``.
    """
    retention = validate_retention(retention)
    counts = torch.as_tensor(counts, dtype=torch.long)
    if retention == 1.0:
        return counts.clone()
    exact = Fraction(repr(retention))
    p, q = exact.numerator, exact.denominator
    if q < _TENSOR_DENOMINATOR_LIMIT:
        # floor(p * N / q) = (N div q) * p + floor((N mod q) * p / q): no term leaves int64
        # (the first is at most N, the product in the second below q * q).
        budget = torch.div(counts, q, rounding_mode="floor") * p + torch.div(
            torch.remainder(counts, q) * p, q, rounding_mode="floor")
    else:
        # Long decimals (0.3333333333333333 is over 10**16ths): exact Python integers, per sample.
        budget = torch.tensor([p * n // q for n in counts.tolist()], dtype=torch.long).to(counts.device)
    budget = torch.clamp(budget, min=1)
    return torch.where(counts > 0, torch.minimum(budget, counts), torch.zeros_like(counts))


def _as_rows(scores: torch.Tensor, k, mask: torch.Tensor | None):
    """Normalise ``scores``/``k``/``mask`` to ``[B, N]``, ``LongTensor[B]``, ``BoolTensor[B, N]``."""
    if not torch.is_tensor(scores) or not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got {type(scores).__name__}"
                        + (f" of dtype {scores.dtype}" if torch.is_tensor(scores) else ""))
    squeeze = scores.ndim == 1
    if squeeze:
        scores = scores.unsqueeze(0)
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape [B, N] (or [N]), got {tuple(scores.shape)}")
    batch, length = scores.shape
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    else:
        mask = torch.as_tensor(mask, device=scores.device).bool()
        if squeeze and mask.ndim == 1:
            mask = mask.unsqueeze(0)
        if mask.shape != scores.shape:
            raise ValueError(f"mask must have the shape of scores {tuple(scores.shape)}, got {tuple(mask.shape)}")
    if isinstance(k, bool):
        raise TypeError("k must be an int or a LongTensor[B], got a bool")
    if isinstance(k, int):
        k = torch.full((batch,), k, dtype=torch.long, device=scores.device)
    elif torch.is_tensor(k):
        if k.is_floating_point() or k.dtype == torch.bool:
            raise TypeError(f"k must be an int or an integer tensor, got dtype {k.dtype}")
        k = k.to(device=scores.device, dtype=torch.long)
        if k.ndim == 0:
            k = k.expand(batch)
        if k.shape != (batch,):
            raise ValueError(f"k must be an int or have shape [B] = [{batch}], got {tuple(k.shape)}")
    else:
        raise TypeError(f"k must be an int or a LongTensor[B], got {type(k).__name__}")
    if bool((k < 0).any()):
        raise ValueError(f"k must be non-negative, got {k.tolist()}")
    return scores, k, mask, squeeze


def hard_topk(scores: torch.Tensor, k, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the ``k`` highest valid scores of each row.

    Ties are broken towards the lower index, so the result is deterministic on every
    device. Rows with ``k >= n_valid`` keep all valid entries.

    Args:
        scores: ``[B, N]`` (or ``[N]``) floating point.
        k: int or ``LongTensor[B]``.
        mask: optional ``BoolTensor[B, N]``, True for valid entries.

    Returns:
        ``BoolTensor`` of the shape of ``scores``.
    """
    scores, k, mask, squeeze = _as_rows(scores, k, mask)
    if bool(torch.isnan(scores[mask]).any()):
        raise ValueError("scores contain NaN; cannot rank visual tokens")
    length = scores.shape[1]
    # Two stable sorts: by score (descending), then valid-before-invalid, so that invalid
    # entries never outrank valid ones and equal scores keep index order.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    valid_in_order = mask.gather(1, order)
    regroup = torch.sort(valid_in_order.to(torch.int8), dim=1, descending=True, stable=True).indices
    order = order.gather(1, regroup)
    rank = torch.arange(length, device=scores.device).unsqueeze(0)
    chosen = (rank < k.unsqueeze(1)) & mask.gather(1, order)
    keep = torch.zeros_like(mask).scatter(1, order, chosen)
    return keep.squeeze(0) if squeeze else keep


def _solve_shift(z: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Find ``t[B]`` with ``sum_i valid * sigmoid(z_i + t) = k`` on the active rows.

    ``z`` is already centred on each row's k-th largest score, so the root lies near 0
    and float32 resolves it even when the scores themselves are huge. Safeguarded
    Newton: a Newton step when it stays inside the bracket, bisection otherwise.
    """
    dtype = z.dtype
    finfo = torch.finfo(dtype)
    n_valid = valid.sum(1).to(dtype)
    kf = k.to(dtype)
    frac = (kf / n_valid.clamp(min=1)).clamp(finfo.tiny, 1 - finfo.eps)
    base = torch.log(frac) - torch.log1p(-frac)
    z_max = torch.where(valid, z, torch.full_like(z, -finfo.max)).amax(1)
    z_min = torch.where(valid, z, torch.full_like(z, finfo.max)).amin(1)
    # n * sigmoid(z_max + t) = k bounds the root from below, n * sigmoid(z_min + t) from above.
    lo = torch.where(active, base - z_max, torch.zeros_like(base))
    hi = torch.where(active, base - z_min, torch.zeros_like(base))
    t = torch.clamp(torch.zeros_like(base), lo, hi)
    tolerance = 4 * finfo.eps * (n_valid + kf)
    for step in range(96):
        p = torch.sigmoid(z + t.unsqueeze(1)) * valid
        excess = p.sum(1) - kf
        lo = torch.where(excess < 0, t, lo)
        hi = torch.where(excess > 0, t, hi)
        slope = (p * torch.sigmoid(-(z + t.unsqueeze(1))) * valid).sum(1)
        newton = t - excess / slope.clamp(min=finfo.tiny)
        inside = (slope > finfo.tiny) & (newton > lo) & (newton < hi)
        t_next = torch.where(inside, newton, 0.5 * (lo + hi))
        done = ~active | (excess.abs() <= tolerance) | (hi - lo <= finfo.eps * (1 + t.abs()))
        t = torch.where(done, t, t_next)
        if step % 4 == 3 and bool(done.all()):
            break
    return t


class _SoftTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, k, mask):
        compute_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
        s = scores.to(compute_dtype)
        n_valid = mask.sum(1)
        active = (k > 0) & (k < n_valid)
        # Centre each row on its k-th largest valid score (clamped to a valid rank).
        ranked = torch.where(mask, s, torch.full_like(s, -torch.inf)).sort(1, descending=True).values
        pivot_rank = (k.clamp(min=1) - 1).clamp(max=(n_valid - 1).clamp(min=0))
        pivot = ranked.gather(1, pivot_rank.unsqueeze(1))
        pivot = torch.where(torch.isfinite(pivot), pivot, torch.zeros_like(pivot))
        z = torch.where(mask, s - pivot, torch.zeros_like(s))
        t = _solve_shift(z, k, mask, active)
        x = z + t.unsqueeze(1)
        p = torch.sigmoid(x)
        slope = p * torch.sigmoid(-x)
        full = (k >= n_valid).unsqueeze(1)
        p = torch.where(active.unsqueeze(1), p, full.to(p.dtype)) * mask
        slope = slope * (active.unsqueeze(1) & mask)
        ctx.save_for_backward(slope)
        ctx.input_dtype = scores.dtype
        return p.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_p):
        (slope,) = ctx.saved_tensors
        g = grad_p.to(slope.dtype)
        gv = g * slope
        total = slope.sum(1, keepdim=True)
        safe_total = torch.where(total > 0, total, torch.ones_like(total))
        grad = gv - slope * gv.sum(1, keepdim=True) / safe_total
        return grad.to(ctx.input_dtype), None, None


def soft_topk(scores: torch.Tensor, k, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable top-k: ``p_i = sigmoid(s_i + t)`` with ``t`` chosen so each row sums to ``k``.

    The shift ``t`` is found per row by a safeguarded Newton iteration in float32
    (float64 for float64 input), whatever the input dtype. The backward pass is the
    implicit gradient of that constraint, not autograd through the iteration: with
    ``v_i = sigmoid'(s_i + t)``, ``grad_s = g * v - v * sum(g * v) / sum(v)``.

    Args:
        scores: ``[B, N]`` (or ``[N]``), any floating dtype.
        k: int or ``LongTensor[B]``: the soft budget of each row.
        mask: optional ``BoolTensor[B, N]``, True for valid entries of padded rows.

    Returns:
        ``p`` with the shape and dtype of ``scores``: in (0, 1), each valid row summing
        to its ``k``, masked entries 0. Rows with ``k >= n_valid`` are all ones (on valid
        entries) and ``k == 0`` all zeros; both have zero gradient.
    """
    scores, k, mask, squeeze = _as_rows(scores, k, mask)
    valid_scores = scores.detach()[mask]
    if valid_scores.numel() and not bool(torch.isfinite(valid_scores).all()):
        raise ValueError("scores must be finite on valid entries (found NaN or inf)")
    p = _SoftTopK.apply(scores, k, mask)
    return p.squeeze(0) if squeeze else p
