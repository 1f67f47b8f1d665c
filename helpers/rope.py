"""Rotary position embeddings, RoPE (lesson 07): positions as rotations of queries and keys.

Su et al. (2021), "RoFormer: Enhanced Transformer with Rotary Position Embedding". Each pair
of channels of a query or key at position ``m`` is rotated by the angle ``m · θ_i``, with
``θ_i = base^(-2i/D)`` for pair ``i`` of ``D/2``. A rotation by ``m θ`` then one by ``-n θ``
is one by ``(m - n) θ``, so the score ``q_m · k_n`` depends on the positions only through
``m - n``: attention sees relative positions, and nothing is added to the token embeddings.

Which channels form a pair is a convention. The paper pairs neighbours ``(x_0, x_1),
(x_2, x_3), ...``; Hugging Face's Llama and Mistral pair the two halves, ``(x_i, x_{i+D/2})``
("rotate half"), and so does this module, so their weights load unchanged.
``base`` is ``rope_theta`` in Hugging Face configs: 10000 in Llama 2 and Mistral 7B, 500000
in Llama 3.
"""

from __future__ import annotations

import torch


def rope_frequencies(head_dim: int, base: float = 10000.0,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """The rotation speeds ``θ_i = base^(-2i/D)``, i = 0 .. D/2 - 1: (D/2,) in float32.

    Pair 0 turns by one radian per position; the last pair turns ``base`` times slower, so
    the pairs measure distance on scales from a few tokens to about ``2π · base``.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE rotates pairs of channels: head_dim must be even, got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim
    return 1.0 / (base ** exponents)  # (D/2,)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles, (L, D) each, in the rotate-half layout.

    positions (L,) are integer positions. The angles ``m θ_i`` are computed in float32 (a
    bfloat16 angle at position 4000 is off by many radians), then cast to ``dtype``; both
    halves of the last dim hold the same angles, ``cat(mθ, mθ)``, as in Hugging Face.
    """
    inv_freq = rope_frequencies(head_dim, base, device=positions.device)  # (D/2,)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (L, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., D): ``(x1, x2) -> (-x2, x1)`` for the halves x1, x2 of the last dim.

    With it, ``x cos + rotate_half(x) sin`` turns each pair ``(x_i, x_{i+D/2})`` by its angle.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys x (B, H, L, D) by the angles of their positions.

    cos, sin: (L, D) from :func:`rope_cos_sin` (or anything that broadcasts to x).
    Returns ``x cos + rotate_half(x) sin``, (B, H, L, D), in the dtype of x.
    """
    if x.shape[-1] != cos.shape[-1]:
        raise ValueError(f"x (..., L, D) has D={x.shape[-1]}, cos and sin have "
                         f"{tuple(cos.shape)}: build them with head_dim={x.shape[-1]}")
    return x * cos + rotate_half(x) * sin


def rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """RoPE in one call: x (B, H, L, D) at integer positions (L,) -> rotated (B, H, L, D)."""
    cos, sin = rope_cos_sin(positions, x.shape[-1], base, dtype=x.dtype)
    return apply_rope(x, cos, sin)
