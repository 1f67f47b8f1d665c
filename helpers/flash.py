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

On these blocks stand FlashAttention itself: the IO model (:func:`hbm_accesses`), the tiled
forward (:func:`flash_attention_reference`, readable, and :func:`flash_attention_forward`,
fast), the causal block schedule (:func:`causal_block_counts`), the recomputation backward
(:func:`flash_attention_backward`), the ``torch.autograd.Function`` that ties them
(:class:`FlashAttention`, :func:`flash_attention`), and a Triton kernel
(:func:`flash_attention_triton`, behind a lazy import: ``helpers.flash_triton``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, TypeVar

import torch

from helpers.attention import check_qkv

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


# --- the IO model of Dao et al. (2022) ---------------------------------------------------

class HBMAccesses(NamedTuple):
    """Elements that one attention forward reads from and writes to HBM."""

    standard: int
    flash: int


def hbm_accesses(L: int, S: int, D: int, Dv: int | None = None, block_q: int = 64
                 ) -> HBMAccesses:
    """HBM reads and writes (in elements) of standard attention and of the tiled forward.

    Standard attention (Dao et al., 2022, Algorithm 0) reads Q and K, writes the (L, S)
    scores, reads them back for the softmax, writes the weights, reads them again with V and
    writes O: ``L·D + S·D + 4·L·S + S·Dv + L·Dv``. The tiled forward in FlashAttention-2's
    loop order (Dao, 2023) reads Q once, K and V once per block of ``block_q`` queries, and
    writes O and the logsumexp: ``L·D + ⌈L / block_q⌉·S·(D + Dv) + L·Dv + L``. Nothing of
    size L x S ever reaches HBM; the price is re-reading K and V, less often the larger the
    query block that fits in SRAM.
    """
    Dv = D if Dv is None else Dv
    if min(L, S, D, Dv) < 0 or block_q < 1:
        raise ValueError(f"sizes must be >= 0 and block_q >= 1, got L={L}, S={S}, D={D}, "
                         f"Dv={Dv}, block_q={block_q}")
    standard = L * D + S * D + 4 * L * S + S * Dv + L * Dv
    flash = L * D + math.ceil(L / block_q) * S * (D + Dv) + L * Dv + L
    return HBMAccesses(standard, flash)


# --- the causal block schedule -------------------------------------------------------------

def visible_keys(q_end: int, L: int, S: int, causal: bool) -> int:
    """How many keys (always a prefix ``0 .. n-1``) the queries ``0 .. q_end-1`` see.

    Without a mask all ``S``; with the bottom-right causal mask of
    :func:`helpers.attention.causal_mask`, query ``i`` sees keys ``0 .. S - L + i``, so the
    block's last query decides: ``S - L + q_end``, clipped to ``0 .. S``.
    """
    return S if not causal else min(S, max(0, S - L + q_end))


class BlockCounts(NamedTuple):
    """(query block, key block) pairs that the causal tiled forward computes and skips."""

    computed: int
    skipped: int


def causal_block_counts(L: int, S: int, block_q: int, block_k: int) -> BlockCounts:
    """How many of the ⌈L/block_q⌉·⌈S/block_k⌉ block pairs causal attention computes, and how
    many it skips because they lie wholly above the (bottom-right) diagonal.

    The same schedule as :func:`flash_attention_forward` and :func:`flash_attention_backward`
    (both ask :func:`visible_keys`), so the count is the work they actually skip.
    """
    _check_blocks(block_q, block_k)
    computed = sum(math.ceil(visible_keys(min(start + block_q, L), L, S, True) / block_k)
                   for start in range(0, L, block_q))
    return BlockCounts(computed, math.ceil(L / block_q) * math.ceil(S / block_k) - computed)


def _causal_block_mask(q_start: int, q_end: int, k_start: int, k_end: int, L: int, S: int,
                       device: torch.device) -> torch.Tensor | None:
    """The (q_end - q_start, k_end - k_start) slice of ``causal_mask(L, S)``, or ``None``
    when the block lies wholly below the diagonal (its first query already sees its last
    key), so that only blocks on the diagonal pay for a mask."""
    if k_end - 1 <= S - L + q_start:
        return None
    rows = torch.arange(q_start, q_end, device=device)[:, None]  # (bq, 1)
    cols = torch.arange(k_start, k_end, device=device)[None, :]  # (1, bk)
    return cols <= S - L + rows  # (bq, bk)


# --- the tiled forward ----------------------------------------------------------------------

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_blocks(block_q: int, block_k: int) -> None:
    if int(block_q) != block_q or int(block_k) != block_k or block_q < 1 or block_k < 1:
        raise ValueError(f"block_q and block_k must be positive integers, got {block_q} and "
                         f"{block_k}")


def _checked_scale(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                   block_q: int, block_k: int) -> float:
    """Validate q (..., L, D), k (..., S, D), v (..., S, Dv) and the blocks; the scale to use."""
    check_qkv(q, k, v)
    if not q.shape[:-2] == k.shape[:-2] == v.shape[:-2]:
        raise ValueError(f"q, k and v must share their leading dims (...): got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    _check_blocks(block_q, block_k)
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def flash_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              causal: bool = False, scale: float | None = None,
                              block_q: int = 64, block_k: int = 64
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiled forward as a readable loop: out (..., L, Dv) and logsumexp (..., L).

    FlashAttention-2's loop order (Dao, 2023): for each block of ``block_q`` queries, visit
    the blocks of ``block_k`` keys it can see (:func:`visible_keys`), attend to each
    (:func:`block_attention`) and fold it into the running result (:func:`merge_attention`).
    Never more than one (block_q, block_k) tile of scores exists. :func:`flash_attention_forward`
    computes the same, faster.
    """
    scale = _checked_scale(q, k, v, scale, block_q, block_k)
    L, S = q.shape[-2], k.shape[-2]
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])  # (..., L, Dv)
    lse = q.new_full(q.shape[:-1], NEG_INF)  # (..., L)
    for q_start in range(0, L, block_q):
        q_end = min(q_start + block_q, L)
        rows = slice(q_start, q_end)
        out_i, lse_i = out[..., rows, :], lse[..., rows]  # (..., bq, Dv), (..., bq)
        for k_start in range(0, visible_keys(q_end, L, S, causal), block_k):
            k_end = min(k_start + block_k, S)
            cols = slice(k_start, k_end)
            mask = _causal_block_mask(q_start, q_end, k_start, k_end, L, S, q.device) \
                if causal else None
            block = block_attention(q[..., rows, :], k[..., cols, :], v[..., cols, :], scale, mask)
            out_i, lse_i = merge_attention(out_i, lse_i, *block)
        out[..., rows, :], lse[..., rows] = out_i, lse_i
    return out, lse


T = TypeVar("T")


def _independent_blocks(work: Callable[[Sequence[int]], T], starts: Sequence[int],
                        device: torch.device) -> list[T]:
    """``work(chunk)`` for chunks of ``starts``, blocks that do not depend on one another.

    On the CPU, one chunk per core, each on a thread of its own with a single torch thread:
    FlashAttention-2's parallelism over blocks (Dao, 2023). Splitting every small tile
    operation over all cores instead would make the cores wait for one another after each
    one, which on a busy machine costs more than the work. Elsewhere (a GPU queues its
    kernels anyway) one chunk, in order. Grad and inference mode follow the caller.
    """
    workers = min(torch.get_num_threads(), len(starts)) if device.type == "cpu" else 1
    if workers <= 1:
        return [work(starts)]
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(chunk: Sequence[int]) -> T:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return work(chunk)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:  # every `workers`-th block: balanced
            return list(pool.map(run, [starts[i::workers] for i in range(workers)]))
    finally:
        torch.set_num_threads(threads)


def _tiled_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   scale: float, block_q: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2's forward (Dao, 2023) on q (N, L, D), k (N, S, D), v (N, S, Dv).

    Each query row keeps a running max ``m``, a running sum ``l`` of ``exp(s - m)`` and an
    unnormalised accumulator ``acc = Σ exp(s - m) v``; when a key block raises the max, ``l``
    and ``acc`` are rescaled by ``exp(m_old - m_new)`` (Milakov & Gimelshein, 2018), in place,
    and ``acc / l`` is taken once at the end. Returns out (N, L, Dv) and lse (N, L).
    """
    N, L, _ = q.shape
    S, Dv = k.shape[1], v.shape[2]
    out = q.new_zeros(N, L, Dv)  # rows that see no key stay 0
    lse = q.new_full((N, L), NEG_INF)
    k_t = k.transpose(1, 2)  # (N, D, S)

    def query_blocks(starts: Sequence[int]) -> None:
        for q_start in starts:
            q_end = min(q_start + block_q, L)
            n_keys = visible_keys(q_end, L, S, causal)
            if n_keys == 0:
                continue  # above the diagonal entirely: every key block is skipped
            q_i = q[:, q_start:q_end] * scale  # (N, bq, D), scaled once, not every tile
            m = q.new_full((N, q_end - q_start, 1), NEG_INF)  # running max
            l = q.new_zeros(N, q_end - q_start, 1)  # running Σ exp(s - m)
            acc = q.new_zeros(N, q_end - q_start, Dv)  # running Σ exp(s - m) v
            for k_start in range(0, n_keys, block_k):
                k_end = min(k_start + block_k, S)
                s = torch.bmm(q_i, k_t[:, :, k_start:k_end])  # (N, bq, bk)
                mask = _causal_block_mask(q_start, q_end, k_start, k_end, L, S, q.device) \
                    if causal else None
                if mask is not None:
                    s.masked_fill_(~mask, NEG_INF)
                m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))  # (N, bq, 1)
                shift = m_new if mask is None else _finite(m_new)  # a row that saw nothing: 0
                alpha = (m - shift).exp_()  # rescales the old state; 0 on the first block
                p = s.sub_(shift).exp_()  # (N, bq, bk), in place of s
                l.mul_(alpha).add_(p.sum(dim=-1, keepdim=True))
                torch.baddbmm(acc.mul_(alpha), p, v[:, k_start:k_end], out=acc)  # acc·α + p v
                m = m_new
            out[:, q_start:q_end] = acc / torch.where(l == 0, torch.ones_like(l), l)
            lse[:, q_start:q_end] = (m + l.log()).squeeze(-1)  # -inf where nothing seen

    _independent_blocks(query_blocks, range(0, L, block_q), q.device)
    return out, lse


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
             scale: float | None, block_q: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_tiled_forward` for any leading dims; float16 and bfloat16 compute in float32."""
    scale = _checked_scale(q, k, v, scale, block_q, block_k)
    lead, (L, D), (S, Dv) = q.shape[:-2], q.shape[-2:], v.shape[-2:]
    compute = torch.float32 if q.dtype in _LOW_PRECISION else q.dtype
    N = lead.numel()  # batch and heads in one dim, for bmm
    out, lse = _tiled_forward(q.reshape(N, L, D).to(compute), k.reshape(N, S, D).to(compute),
                              v.reshape(N, S, Dv).to(compute), causal, scale, block_q, block_k)
    return out.reshape(*lead, L, Dv).to(q.dtype), lse.reshape(*lead, L)


# --- the backward from recomputation ---------------------------------------------------------

def flash_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
                             causal: bool = False, scale: float | None = None,
                             block_q: int = 64, block_k: int = 64,
                             dlse: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of the tiled forward, recomputing the weights tile by tile (Dao et al., 2022).

    Needs only the inputs, the output (..., L, Dv), its logsumexp (..., L) and the incoming
    gradient ``dout`` (..., L, Dv) (and ``dlse`` (..., L) if the logsumexp itself is used
    downstream): ``delta = rowsum(dout ⊙ out) - dlse``, then for every visible block pair
    :func:`block_attention_backward`. FlashAttention-2's loop order: key blocks outer (their
    dk, dv finish in one pass), query blocks inner (dq accumulates). Never more than one
    (block_q, block_k) tile of weights exists.
    """
    scale = _checked_scale(q, k, v, scale, block_q, block_k)
    compute = torch.float32 if q.dtype in _LOW_PRECISION else q.dtype
    q, k, v, out, dout = (t.to(compute) for t in (q, k, v, out, dout))
    lse = lse.to(compute)
    delta = (dout * out).sum(dim=-1)  # (..., L)
    if dlse is not None:
        delta = delta - dlse.to(compute)  # ∂lse/∂s = p: ds = p ⊙ (dp - delta + dlse)
    L, S = q.shape[-2], k.shape[-2]
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)

    def key_blocks(starts: Sequence[int]) -> torch.Tensor:
        """dk, dv of these key blocks (written in place) and their share of dq (returned)."""
        dq = torch.zeros_like(q)
        for k_start in starts:
            k_end = min(k_start + block_k, S)
            cols = slice(k_start, k_end)
            # the first query that sees key k_start is S - L rows earlier than it (or row 0)
            first = max(0, k_start - (S - L)) // block_q * block_q if causal else 0
            for q_start in range(first, L, block_q):
                q_end = min(q_start + block_q, L)
                rows = slice(q_start, q_end)
                mask = _causal_block_mask(q_start, q_end, k_start, k_end, L, S, q.device) \
                    if causal else None
                dq_ij, dk_ij, dv_ij = block_attention_backward(
                    q[..., rows, :], k[..., cols, :], v[..., cols, :], dout[..., rows, :],
                    lse[..., rows], delta[..., rows], scale, mask)
                dq[..., rows, :] += dq_ij
                dk[..., cols, :] += dk_ij
                dv[..., cols, :] += dv_ij
        return dq

    # each chunk of key blocks owns its dk, dv rows; the chunks' dq are summed
    dq = sum(_independent_blocks(key_blocks, range(0, S, block_k), q.device),
             torch.zeros_like(q))
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    """Tiled attention whose backward recomputes the weights instead of storing them.

    ``FlashAttention.apply(q, k, v, causal, scale, block_q, block_k) -> (out, lse)``. The
    forward saves q, k, v, out and the logsumexp, O(n) memory, never the (L, S) weights; the
    backward is :func:`flash_attention_backward` (Dao et al., 2022, section 3.1).
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                scale: float | None, block_q: int, block_k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = _forward(q, k, v, causal, scale, block_q, block_k)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (causal, scale, block_q, block_k)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative raises, never lies
    def backward(ctx, dout: torch.Tensor, dlse: torch.Tensor
                 ) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(q, k, v, out, lse, dout, *ctx.options, dlse=dlse)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            causal: bool = False, scale: float | None = None,
                            block_q: int = 64, block_k: int = 64
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention by tiles: out (..., L, Dv) and logsumexp (..., L), never the (L, S) matrix.

    q (..., L, D), k (..., S, D), v (..., S, Dv) with the same leading dims; ``causal`` is
    the bottom-right mask of :func:`helpers.attention.causal_mask` (key blocks wholly above
    the diagonal are skipped, see :func:`causal_block_counts`); ``scale`` defaults to
    1/√D. A query that sees no key gets a zero output and ``lse = -inf``. Both results are
    differentiable through :class:`FlashAttention`'s recomputation backward. The block sizes
    are tiles of SRAM on a GPU; on a CPU, larger blocks (hundreds of rows) amortise
    Python's per-tile cost.
    """
    return FlashAttention.apply(q, k, v, causal, scale, block_q, block_k)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    scale: float | None = None, block_q: int = 64, block_k: int = 64
                    ) -> torch.Tensor:
    """FlashAttention (Dao et al., 2022; Dao, 2023): :func:`flash_attention_forward`'s output
    (..., L, Dv) alone, differentiable through the recomputation backward."""
    return flash_attention_forward(q, k, v, causal, scale, block_q, block_k)[0]


def flash_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           causal: bool = False, scale: float | None = None,
                           block_q: int = 64, block_k: int = 64
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same forward as one Triton kernel (forward only): out (..., L, Dv), lse (..., L).

    Needs the ``triton`` extra; compiled on a CUDA GPU, run by Triton's interpreter on CPU
    tensors (``TRITON_INTERPRET=1``). See :mod:`helpers.flash_triton`.
    """
    from helpers import flash_triton  # imported here: triton is an optional extra

    return flash_triton.flash_attention_triton(q, k, v, causal, scale, block_q, block_k)
