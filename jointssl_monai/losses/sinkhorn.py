"""Sinkhorn-Knopp equipartition codes (SwAV, Caron et al., NeurIPS 2020, Alg. 1 / Eq. 3)."""

from __future__ import annotations

import torch

from jointssl_monai.utils.dist import all_reduce_max, all_reduce_sum

__all__ = ["sinkhorn_knopp"]


@torch.no_grad()
def sinkhorn_knopp(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    distributed: bool | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Soft codes ``Q`` that spread the batch equally over the prototypes (SwAV, Eq. 3).

    Solves ``max_Q Tr(Q^T C^T Z) + epsilon H(Q)`` over the transportation polytope with a few Sinkhorn
    iterations on ``exp(scores / epsilon)``. Convention of SwAV: each returned row (sample) sums to 1 and each
    column (prototype) receives ``B / K`` of the total mass ``B`` once converged. The last normalisation is
    over samples, so row sums are exact and column sums are approximate after few iterations.

    Across processes only the per-prototype sums, the total and the per-prototype maxima are all-reduced
    (``K + 1`` numbers per iteration, never features), so ``N`` processes give the codes one process would
    give on the concatenated batch.

    Numerics: computed outside autocast in float32 (float64 if ``scores`` is float64 or ``dtype`` says so).
    Before ``exp``, each prototype's global maximum over the batch is subtracted: no entry overflows, every
    prototype keeps an entry equal to 1 (no prototype has zero mass, even for huge scores), and the first
    per-prototype normalisation cancels this shift exactly: the codes are SwAV's (``distributed_sinkhorn``) up
    to rounding. Sums are clamped to the smallest normal number: no inf or NaN can appear. There is no
    per-sample shift (it would not cancel after a few iterations: it changed the codes by several per cent on
    small problems), so a sample can underflow: when each of its scores lies more than about
    ``(87 - ln(BK)) epsilon`` below that prototype's batch maximum (float32; 708 instead of 87 in float64),
    its entries flush to zero and its code comes out all zero (or, just at the edge, summing to less than 1);
    it then adds nothing to a cross-entropy. With L2-normalised embeddings and prototypes the scores lie in
    ``[-1, 1]``, so such a gap is at most 2 and this cannot happen in float32 for ``epsilon >= 0.03`` with
    ``B * K`` up to ``1e7``; it can with smaller ``epsilon`` or with scores far beyond the cosine range (where
    SwAV's own code underflows too, or overflows).

    Args:
        scores: ``(B, K)`` prototype scores of the local batch (``B`` may be 0 on some processes).
        epsilon: entropic regularisation (SwAV: 0.05).
        iterations: Sinkhorn iterations (SwAV: 3).
        distributed: ``None`` reduces across processes whenever a process group is initialised.
        dtype: computation dtype, float32 or float64; defaults to float64 for float64 scores, else float32.

    Returns:
        ``(B, K)`` codes, no gradient, in the computation dtype.
    """
    if scores.ndim != 2:
        raise ValueError(f"sinkhorn_knopp: scores must be (B, K), got shape {tuple(scores.shape)}.")
    if epsilon <= 0 or iterations < 1:
        raise ValueError(
            f"sinkhorn_knopp: need epsilon > 0 and iterations >= 1, got {epsilon}, {iterations}."
        )
    if dtype is None:
        dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"sinkhorn_knopp: dtype must be float32 or float64, got {dtype}.")
    tiny = torch.finfo(dtype).tiny
    with torch.autocast(device_type=scores.device.type, enabled=False):
        logits = scores.detach().to(dtype) / epsilon
        num_prototypes = logits.shape[1]
        # Global per-prototype maximum; -inf for an empty local batch so it never wins.
        row_max = (
            logits.max(dim=0).values if logits.shape[0] > 0 else logits.new_full((num_prototypes,), -1e30)
        )
        all_reduce_max(row_max, distributed)
        logits -= row_max  # cancelled exactly by the first per-prototype normalisation
        q = torch.exp(logits).t()  # (K, B), as in SwAV; every prototype holds a 1, all entries <= 1
        totals = torch.stack([q.sum(), q.new_tensor(q.shape[1])])
        all_reduce_sum(totals, distributed)
        total, batch = totals[0], totals[1]
        q /= total.clamp_min(tiny)
        for _ in range(iterations):
            per_prototype = q.sum(dim=1, keepdim=True)
            all_reduce_sum(per_prototype, distributed)
            q /= per_prototype.clamp_min(tiny)
            q /= num_prototypes
            q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)
            q /= batch
        q *= batch  # columns sum to 1: each sample's code is a distribution over prototypes
        return q.t()
