"""Attention one block of keys at a time: the pieces FlashAttention and ring attention share
(lessons 06 and 08).

A block's partial result is kept as ``(out, lse)``: the attention output over that block's
keys alone, already normalised, and the logsumexp of its scaled scores. Two partial results
merge exactly (:func:`merge_attention`), so attention over all keys can be computed block
by block without ever holding the (L, S) matrix of weights: the online softmax of Milakov &
Gimelshein (2018), "Online normalizer calculation for softmax", as FlashAttention uses it
(Dao et al., 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with
IO-Awareness"; Dao, 2023, "FlashAttention-2"). The backward of a block needs only q, k, v,
the final logsumexp and ``delta = rowsum(dout * out)``: the weights are recomputed, not
stored.

Shapes: q (..., L, D), k (..., S, D), v (..., S, Dv); a boolean ``mask`` broadcasts to
(..., L, S), ``True`` = attend. A query row that sees no key of a block has ``lse = -inf``
and a zero output, and contributes nothing when merged.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with ``-inf`` (rows that saw no key) replaced by 0, safe to subtract."""
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None
            ) -> torch.Tensor:
    """Scaled scores (..., L, S) of one block, ``-inf`` where the mask forbids."""
    scores = q @ k.transpose(-2, -1) * scale  # (..., L, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, NEG_INF)
    return scores


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (..., L, D) over one block of keys: out (..., L, Dv), lse (..., L).

    ``out`` is normalised over this block's keys only; ``lse = log Σ_j exp(q·k_j · scale)``
    over the keys the mask allows, ``-inf`` for a row that allows none (its out is 0).
    """
    scores = _scores(q, k, scale, mask)  # (..., L, S)
    lse = torch.logsumexp(scores, dim=-1)  # (..., L)
    weights = (scores - _finite(lse)[..., None]).exp()  # (..., L, S), 0 where masked
    return weights @ v, lse  # (..., L, Dv), (..., L)


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                    lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the keys of blocks a and b together, from their partial results.

    Each block's output is reweighted by its share of the total softmax mass,
    ``exp(lse_block - lse)``: exact, in any order. out (..., L, Dv), lse (..., L).
    """
    lse = torch.logaddexp(lse_a, lse_b)  # (..., L), -inf only if both are
    safe = _finite(lse)
    share_a = (lse_a - safe).exp()[..., None]  # (..., L, 1), 0 where lse_a = -inf
    share_b = (lse_b - safe).exp()[..., None]
    return out_a * share_a + out_b * share_b, lse


def block_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             dout: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
                             scale: float, mask: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block's share of the gradients of attention over all keys: dq, dk, dv.

    ``lse`` (..., L) is the logsumexp over *all* keys (the forward's result) and
    ``delta = (dout * out).sum(-1)`` (..., L) with the final output, so the weights
    ``p = exp(scores - lse)`` recomputed here are the true ones. Then ``dv = pᵀ dout``,
    ``ds = p ⊙ (dout vᵀ - delta)``, ``dq = ds k · scale``, ``dk = dsᵀ q · scale``. dq sums
    over blocks of keys; dk and dv belong to this block.
    """
    p = (_scores(q, k, scale, mask) - _finite(lse)[..., None]).exp()  # (..., L, S)
    dv = p.transpose(-2, -1) @ dout  # (..., S, Dv)
    ds = p * (dout @ v.transpose(-2, -1) - delta[..., None])  # (..., L, S)
    dq = ds @ k * scale  # (..., L, D)
    dk = ds.transpose(-2, -1) @ q * scale  # (..., S, D)
    return dq, dk, dv
