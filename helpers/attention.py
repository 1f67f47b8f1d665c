"""Scaled dot-product attention, its masks, and multi-head attention (lessons 02 to 04, 07).

The reference implementations that later lessons import. Conventions follow
``torch.nn.functional.scaled_dot_product_attention``: tensors are ``(batch, heads, seq,
head_dim)`` (any leading dims work), a boolean mask is ``True`` where attention is allowed
and broadcasts against ``(batch, heads, L, S)``, and ``scale`` defaults to ``1/sqrt(head_dim)``.

A query row whose mask allows nothing yields zeros, with zero gradients. PyTorch's
``F.scaled_dot_product_attention`` does the same on the CPU since torch 2.5 (its
``_safe_softmax``, pytorch/pytorch#133882); before 2.5 it returned NaN there, and
``torch.softmax`` over a row of ``-inf`` and ``nn.MultiheadAttention`` with every key masked
still return NaN. One choice differs from PyTorch: :func:`causal_mask` is aligned bottom
right, as a KV-cache decode needs (``is_causal=True`` is aligned top left when L != S).

Papers: Vaswani et al. (2017) "Attention Is All You Need"; Shazeer (2019) "Fast Transformer
Decoding: One Write-Head is All You Need" (MQA); Ainslie et al. (2023) "GQA: Training
Generalized Multi-Query Transformer Models from Multi-Head Checkpoints"; Jiang et al. (2023)
"Mistral 7B" (sliding-window attention); Beltagy et al. (2020) "Longformer: The
Long-Document Transformer" (global tokens); Xiao et al. (2024) "Efficient Streaming Language
Models with Attention Sinks".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.torch_version import TorchVersion

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Numerically stable softmax along ``dim``: ``exp(x - max) / sum(exp(x - max))``.

    Subtracting the row maximum keeps every ``exp`` in ``[0, 1]``, so large logits never
    overflow. A row that is all ``-inf`` (nothing to attend to) yields zeros, not NaN.
    """
    row_max = x.amax(dim=dim, keepdim=True)
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    exp = (x - row_max).exp()
    total = exp.sum(dim=dim, keepdim=True)
    return exp / torch.where(total == 0, torch.ones_like(total), total)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise a readable error when q, k, v do not fit ``(..., L, D), (..., S, D), (..., S, Dv)``."""
    if q.dim() < 2 or k.dim() < 2 or v.dim() < 2:
        raise ValueError("q, k, v need at least 2 dims (..., seq, head_dim), got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q (..., L, D) and k (..., S, D) must share D: q has shape "
                         f"{tuple(q.shape)}, k has shape {tuple(k.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k (..., S, D) and v (..., S, Dv) must share S: k has shape "
                         f"{tuple(k.shape)}, v has shape {tuple(v.shape)}")


def _check_mask(mask: torch.Tensor, scores_shape: torch.Size, dims: str = "(..., L, S)"
                ) -> None:
    """Raise a readable error unless ``mask`` broadcasts to the scores, of shape ``dims``."""
    try:
        fits = torch.broadcast_shapes(mask.shape, scores_shape) == scores_shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the "
                         f"scores {dims} = {tuple(scores_shape)}")


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q kᵀ · scale + mask) v`` (Vaswani et al., 2017), returning output and weights.

    q: (..., L, D), k: (..., S, D), v: (..., S, Dv). ``mask`` broadcasts to (..., L, S):
    boolean, ``True`` = attend; or floating, added to the scores (an additive bias, as in
    PyTorch). Returns out (..., L, Dv) and weights (..., L, S) in the dtype of ``q``; float16
    and bfloat16 inputs are computed in float32. Fully masked query rows give zeros.
    """
    check_qkv(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    compute = torch.float32 if q.dtype in _LOW_PRECISION else q.dtype
    scores = q.to(compute) @ k.to(compute).transpose(-2, -1) * scale  # (..., L, S)
    if mask is not None:
        _check_mask(mask, scores.shape)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(compute)
    weights = softmax(scores, dim=-1)  # (..., L, S)
    out = weights @ v.to(compute)  # (..., L, Dv)
    return out.to(q.dtype), weights.to(q.dtype)


def causal_mask(L: int, S: int | None = None, device: torch.device | str | None = None
                ) -> torch.Tensor:
    """(L, S) boolean mask, aligned bottom right: query ``i`` sees keys ``0 .. S - L + i``.

    With ``S > L`` the queries are the last ``L`` positions of the sequence (a KV-cache
    decode step). PyTorch's ``is_causal=True`` is aligned top left instead when ``L != S``.
    """
    S = L if S is None else S
    return torch.ones(L, S, dtype=torch.bool, device=device).tril(S - L)


def padding_mask(lengths: torch.Tensor, S: int) -> torch.Tensor:
    """(B, 1, 1, S) boolean mask from the true lengths (B,): key ``j`` of sequence ``b`` is
    visible when ``j < lengths[b]``; it broadcasts over heads and queries."""
    if lengths.dim() != 1:
        raise ValueError(f"lengths should have shape (B,), got {tuple(lengths.shape)}")
    keys = torch.arange(S, device=lengths.device)  # (S,)
    return (keys < lengths[:, None])[:, None, None, :]  # (B, 1, 1, S)


def sliding_window_mask(L: int, window: int, device: torch.device | str | None = None, *,
                        S: int | None = None, n_global: int = 0) -> torch.Tensor:
    """(L, S) causal boolean mask where each query sees ``window`` keys including itself.

    Mistral's rule (Jiang et al., 2023): key ``j`` is visible from query ``i`` when
    ``i - window < j <= i``. With ``S > L`` (S defaults to L) the queries are the last ``L``
    of ``S`` positions, aligned bottom right as :func:`causal_mask` (a decode step over cached
    keys). The first ``n_global`` positions are global tokens (Longformer, Beltagy et al.,
    2020) or attention sinks (Xiao et al., 2024): every later query sees them too, however far.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1 (the query itself), got {window}")
    S = L if S is None else S
    if S < L:
        raise ValueError(f"S={S} keys cannot be fewer than the L={L} queries among them")
    if n_global < 0:
        raise ValueError(f"n_global must be >= 0, got {n_global}")
    i = torch.arange(S - L, S, device=device)[:, None]  # (L, 1): position of each query
    j = torch.arange(S, device=device)[None, :]  # (1, S)
    return (j <= i) & ((j > i - window) | (j < n_global))


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, S, D) -> (B, H_kv * n_rep, S, D): each K/V head repeated for its query heads.

    Blocked, as grouped-query attention needs (Ainslie et al., 2023): query head ``h`` reads
    K/V head ``h // n_rep``, so the copies of head 0 come first. The same as
    ``x.repeat_interleave(n_rep, dim=1)``, written as Hugging Face's Llama does.
    """
    if x.dim() != 4:
        raise ValueError(f"x should have shape (B, H_kv, S, D), got {tuple(x.shape)}")
    if n_rep < 1:
        raise ValueError(f"n_rep must be at least 1, got {n_rep}")
    if n_rep == 1:
        return x
    B, H_kv, S, D = x.shape
    return x[:, :, None].expand(B, H_kv, n_rep, S, D).reshape(B, H_kv * n_rep, S, D)


def mean_pool_heads(weight: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """A K or V projection's weight (H*D, ...) or bias (H*D,) -> (H_kv*D, ...), heads averaged.

    Ainslie et al. (2023) turn a multi-head checkpoint into a grouped-query one by
    mean-pooling the key and value heads of each group (heads ``g*G .. g*G + G - 1`` for
    group ``g``, ``G = n_heads // n_kv_heads``), then train it a little more ("uptraining").
    """
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")
    if weight.shape[0] % n_heads:
        raise ValueError(f"weight's first dim {weight.shape[0]} (H*D) is not divisible by "
                         f"n_heads={n_heads}")
    head_dim = weight.shape[0] // n_heads
    grouped = weight.reshape(n_kv_heads, n_heads // n_kv_heads, head_dim, *weight.shape[1:])
    return grouped.mean(dim=1).reshape(n_kv_heads * head_dim, *weight.shape[1:])


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, L, H*D) -> (B, H, L, D): cut the feature dim into ``n_heads`` heads."""
    if x.dim() != 3 or x.shape[-1] % n_heads:
        raise ValueError(f"x should have shape (B, L, H*D) with H*D divisible by "
                         f"n_heads={n_heads}, got {tuple(x.shape)}")
    B, L, E = x.shape
    return x.reshape(B, L, n_heads, E // n_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (B, L, H*D): the inverse of :func:`split_heads`."""
    if x.dim() != 4:
        raise ValueError(f"x should have shape (B, H, L, D), got {tuple(x.shape)}")
    B, H, L, D = x.shape
    return x.transpose(1, 2).reshape(B, L, H * D)


class MultiHeadAttention(nn.Module):
    """Multi-head attention (Vaswani et al., 2017) with optional grouped K/V heads.

    ``n_kv_heads`` K/V heads are shared by groups of query heads: ``n_kv_heads == n_heads``
    is standard MHA, ``1`` is multi-query attention (Shazeer, 2019), anything between is
    grouped-query attention (Ainslie et al., 2023). Query head ``h`` uses K/V head
    ``h // (n_heads // n_kv_heads)``, as ``enable_gqa`` in PyTorch's SDPA. ``head_dim``
    defaults to ``d_model // n_heads``; Llama-family models may choose another.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None,
                 bias: bool = True, head_dim: int | None = None):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if head_dim is None and d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads if head_dim is None else head_dim
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, need_weights: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (B, L, d_model) attends to ``context`` (B, S, d_model), itself by default.

        ``mask`` broadcasts to (B, H, L, S) (``True`` = attend). Returns out (B, L, d_model),
        or (out, weights (B, H, L, S)) when ``need_weights``. Without weights the fused
        PyTorch kernel runs (:func:`_fused_attention`); with them, the readable reference.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x should have shape (B, L, d_model={self.d_model}), "
                             f"got {tuple(x.shape)}")
        context = x if context is None else context
        if context.dim() != 3 or context.shape[-1] != self.d_model:
            raise ValueError(f"context should have shape (B, S, d_model={self.d_model}), "
                             f"got {tuple(context.shape)}")
        q = split_heads(self.q_proj(x), self.n_heads)  # (B, H, L, D)
        k = split_heads(self.k_proj(context), self.n_kv_heads)  # (B, Hkv, S, D)
        v = split_heads(self.v_proj(context), self.n_kv_heads)  # (B, Hkv, S, D)
        group = self.n_heads // self.n_kv_heads
        k, v = repeat_kv(k, group), repeat_kv(v, group)  # (B, H, S, D)
        if mask is not None:
            scores_shape = torch.Size((x.shape[0], self.n_heads, x.shape[1], k.shape[2]))
            _check_mask(mask, scores_shape, "(B, H, L, S)")
        if need_weights:
            out, weights = scaled_dot_product_attention(q, k, v, mask=mask)
            return self.out_proj(merge_heads(out)), weights
        return self.out_proj(merge_heads(_fused_attention(q, k, v, mask)))

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> MultiHeadAttention:
        """A copy of ``torch.nn.MultiheadAttention``'s weights in this module.

        PyTorch stores the three input projections stacked in ``in_proj_weight`` (3E, E),
        in the order q, k, v; ``batch_first`` changes only the input layout, not the weights.
        """
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("from_torch supports nn.MultiheadAttention with kdim = vdim = "
                             "embed_dim, add_bias_kv=False and add_zero_attn=False")
        bias = mha.in_proj_bias is not None
        ours = cls(mha.embed_dim, mha.num_heads, bias=bias)
        ours = ours.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            for proj, w in zip((ours.q_proj, ours.k_proj, ours.v_proj),
                               mha.in_proj_weight.chunk(3)):
                proj.weight.copy_(w)
            ours.out_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                for proj, b in zip((ours.q_proj, ours.k_proj, ours.v_proj),
                                   mha.in_proj_bias.chunk(3)):
                    proj.bias.copy_(b)
                ours.out_proj.bias.copy_(mha.out_proj.bias)
        return ours


def _sdpa_zeroes_masked_rows(device: torch.device | str,
                            version: str = torch.__version__) -> bool:
    """Whether ``F.scaled_dot_product_attention`` gives zeros and zero gradients, not NaN, for
    a query row whose mask allows nothing, on ``device`` with torch ``version``.

    Yes on the CPU from torch 2.5 (pytorch/pytorch#133882). Torch 2.2 to 2.4 return NaN; the
    CUDA kernels (cuDNN, memory-efficient) have returned NaN for such rows in releases after
    2.5 too, so any other device is treated as not zeroing them.
    """
    return torch.device(device).type == "cpu" and TorchVersion(version) >= (2, 5)


def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None, guard: bool | None = None) -> torch.Tensor:
    """The fast path of :class:`MultiHeadAttention`: PyTorch's fused SDPA kernel, (B, H, L, D).

    Where PyTorch may return NaN for a query row whose mask allows nothing
    (``guard``, by default ``not _sdpa_zeroes_masked_rows(q.device)``), such rows attend
    everywhere (so no NaN reaches the gradients) and are then zeroed, as the reference does.
    """
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    if guard is None:
        guard = not _sdpa_zeroes_masked_rows(q.device)
    if not guard:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    is_bool = mask.dtype == torch.bool
    allowed = mask if is_bool else ~torch.isneginf(mask)  # broadcasts to (B, H, L, S)
    has_key = allowed.any(dim=-1, keepdim=True)  # (..., L, 1)
    safe = mask | ~has_key if is_bool else mask.to(q.dtype).masked_fill(~has_key, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe)  # (B, H, L, D)
    return torch.where(has_key, out, torch.zeros_like(out))
