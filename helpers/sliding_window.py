"""Sliding-window attention computed band by band, in O(n·W) time and memory (lesson 07).

With a window of W keys (Mistral's rule: query ``i`` sees key ``j`` when ``i - W < j <= i``,
Jiang et al., 2023, "Mistral 7B"; Beltagy et al., 2020, "Longformer") a query needs only
the W keys just before it. Masking the full (n, n) score matrix gives the right answer but
still pays for all n² scores. Here the queries are cut into blocks of T consecutive
positions; block b needs only the ``T + W - 1`` keys from the first one its first query
sees to its last query, so it attends to that slice alone. The work is
``n/T · T · (T + W - 1)``, which is O(n·W) for T ≤ W, and no (n, n) tensor ever exists.

:func:`sliding_window_attention` equals ``scaled_dot_product_attention(q, k, v,
mask=sliding_window_mask(L, W, S=S, n_global=G))`` (the tests prove it), global tokens
included: the first G keys are scored separately against every query, which adds O(n·G).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _band_mask(n_blocks: int, T: int, W: int, front: int, n_global: int, first_position: int,
               device: torch.device) -> torch.Tensor:
    """(n_blocks, T, T + W - 1 + G) boolean mask: which padded keys each query of each block sees.

    Within a block, query r sees window keys c with r <= c <= r + W - 1 (its band), except
    the ``front`` padding keys before the sequence. Global key g is seen by a query at
    position p when g <= p - W, i.e. when the band does not already hold it.
    """
    r = torch.arange(T, device=device)[:, None]  # (T, 1)
    c = torch.arange(T + W - 1, device=device)[None, :]  # (1, T + W - 1)
    band = (c >= r) & (c <= r + W - 1)  # (T, T + W - 1)
    start = torch.arange(n_blocks, device=device)[:, None, None] * T  # (nb, 1, 1)
    real = start + c >= front  # (nb, 1, T + W - 1): padded key index b*T + c is a real key
    mask = band & real  # (nb, T, T + W - 1)
    if n_global:
        position = first_position + start + r  # (nb, T, 1): the position of each query
        g = torch.arange(n_global, device=device)  # (G,)
        mask = torch.cat([mask, g <= position - W], dim=-1)  # (nb, T, T + W - 1 + G)
    return mask


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             n_global: int = 0, scale: float | None = None,
                             block_size: int | None = None) -> torch.Tensor:
    """Causal sliding-window attention, block by block: out (B, H, L, Dv) in O(L·(W + G)).

    q (B, H, L, D), k (B, H, S, D), v (B, H, S, Dv) with L <= S: the queries are the last L
    of S positions (bottom right, as after a KV cache). Query at position p sees keys
    ``p - window < j <= p`` and the first ``n_global`` keys. ``block_size`` T (default
    ``min(window, L)``) is the number of queries per block. Each block runs PyTorch's fused
    SDPA over its own ``T + W - 1`` keys (plus the global ones); no (L, S) tensor is built.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v should have shapes (B, H, L, D), (B, H, S, D), (B, H, S, Dv),"
                         f" got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, L, D = q.shape
    S, Dv = k.shape[-2], v.shape[-1]
    if k.shape[:2] != (B, H) or v.shape[:3] != k.shape[:3] or k.shape[-1] != D:
        raise ValueError(f"k (B, H, S, D) and v (B, H, S, Dv) do not fit q (B, H, L, D): "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if window < 1:
        raise ValueError(f"window must be at least 1 (the query itself), got {window}")
    if L > S:
        raise ValueError(f"L={L} queries need at least as many keys, got S={S}")
    W, G = window, min(n_global, S)
    T = min(W, L) if block_size is None else block_size
    n_blocks = -(-L // T)
    # Keys any window can reach: positions S - L - W + 1 .. S - 1. Pad in front so that the
    # band of query i starts at padded key i, and at the end so that every block is full.
    first = max(0, S - L - W + 1)
    front = L + W - 1 - (S - first)
    back = n_blocks * T - L
    k_band = F.pad(k[:, :, first:], (0, 0, front, back))  # (B, H, nb*T + W - 1, D)
    v_band = F.pad(v[:, :, first:], (0, 0, front, back))  # (B, H, nb*T + W - 1, Dv)
    k_blocks = k_band.unfold(2, T + W - 1, T).transpose(-2, -1)  # (B, H, nb, T + W - 1, D)
    v_blocks = v_band.unfold(2, T + W - 1, T).transpose(-2, -1)  # (B, H, nb, T + W - 1, Dv)
    if G:  # the global keys join every block's keys
        k_blocks = torch.cat([k_blocks, k[:, :, None, :G].expand(B, H, n_blocks, G, D)], dim=3)
        v_blocks = torch.cat([v_blocks, v[:, :, None, :G].expand(B, H, n_blocks, G, Dv)], dim=3)
    q_blocks = F.pad(q, (0, 0, 0, back)).reshape(B * H, n_blocks, T, D)
    mask = _band_mask(n_blocks, T, W, front, G, S - L, q.device)  # (nb, T, T + W - 1 + G)
    # a 4-D mask: with a 3-D one PyTorch's CPU kernel falls back to materialising the scores
    out = F.scaled_dot_product_attention(
        q_blocks, k_blocks.reshape(B * H, n_blocks, -1, D),
        v_blocks.reshape(B * H, n_blocks, -1, Dv), attn_mask=mask[None], scale=scale)
    return out.reshape(B, H, n_blocks * T, Dv)[:, :, :L]  # (B, H, L, Dv)
