"""FlashAttention's forward as one Triton kernel (lesson 06): the tiled loop of
:func:`helpers.flash.flash_attention_forward`, written for a GPU.

Triton (Tillet, Kung & Cox, 2019, "Triton: An Intermediate Language and Compiler for Tiled
Neural Network Computations") programs a GPU one *block* at a time: each program instance
owns a tile of ``BLOCK_M`` queries of one (batch, head), keeps its running max, sum and
accumulator in registers and SRAM, and streams the key/value blocks through: the forward of
FlashAttention-2 (Dao, 2023), Algorithm 1.

On a CUDA GPU the kernel compiles. On CPU tensors Triton's interpreter runs the same code
with NumPy, when ``TRITON_INTERPRET=1`` is set before this module is imported (Triton reads it
when ``@triton.jit`` decorates the kernel): slow, but exact, and enough to write and test a
kernel on a laptop. Needs the optional extra: ``pip install 'attention-course[triton]'``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

try:
    import triton
    import triton.language as tl
except ImportError as error:  # an optional extra: say how to get it
    raise ImportError("helpers.flash_triton needs Triton, the optional extra `triton`: "
                      "pip install 'attention-course[triton]' (or pip install triton)") from error
from triton.runtime.interpreter import InterpretedFunction

from helpers.flash import _checked_scale


@triton.jit
def flash_forward_kernel(Q, K, V, O, LSE,
                         stride_qh, stride_ql, stride_kh, stride_ks, stride_vh, stride_vs,
                         stride_oh, stride_ol,
                         L, S, D, DV, scale,
                         CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One program: queries ``BLOCK_M·m .. BLOCK_M·(m+1) - 1`` of head ``h`` (the grid is
    (⌈L / BLOCK_M⌉, heads)). Q (heads, L, D), K (heads, S, D), V (heads, S, DV) with a unit
    stride along the last dim; writes O (heads, L, DV) and LSE (heads, L) in float32."""
    block, head = tl.program_id(0), tl.program_id(1)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query positions
    dims, dims_v = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)  # padded head dims
    q = tl.load(Q + head * stride_qh + rows[:, None] * stride_ql + dims[None, :],
                mask=(rows[:, None] < L) & (dims[None, :] < D), other=0.0)  # (BLOCK_M, BLOCK_D)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scores
    l = tl.zeros([BLOCK_M], tl.float32)  # running Σ exp(s - m)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)  # running Σ exp(s - m) v

    n_keys = S  # keys this block of queries can see: all, or up to its last query's diagonal
    if CAUSAL:
        n_keys = tl.minimum(S, tl.maximum(0, S - L + (block + 1) * BLOCK_M))
    for start in range(0, n_keys, BLOCK_N):  # blocks above the diagonal are never visited
        cols = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key positions
        k = tl.load(K + head * stride_kh + cols[:, None] * stride_ks + dims[None, :],
                    mask=(cols[:, None] < S) & (dims[None, :] < D), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # (BLOCK_M, BLOCK_N)
        allowed = cols[None, :] < S  # the ragged last block
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= S - L + rows[:, None])
        s = tl.where(allowed, s, float("-inf"))

        m_new = tl.maximum(m, tl.max(s, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw nothing yet
        alpha = tl.exp(m - shift)  # rescales the old state (0 on the first block)
        p = tl.exp(s - shift[:, None])  # (BLOCK_M, BLOCK_N)
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(V + head * stride_vh + cols[:, None] * stride_vs + dims_v[None, :],
                    mask=(cols[:, None] < S) & (dims_v[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m = m_new

    seen = l > 0  # a query that sees no key: zero output, lse = -inf
    out = acc / tl.where(seen, l, 1.0)[:, None]
    lse = tl.where(seen, m + tl.log(tl.where(seen, l, 1.0)), float("-inf"))
    tl.store(O + head * stride_oh + rows[:, None] * stride_ol + dims_v[None, :], out,
             mask=(rows[:, None] < L) & (dims_v[None, :] < DV))
    tl.store(LSE + head * L + rows, lse, mask=rows < L)


def _block_size(n: int) -> int:
    """A power of two >= n and >= 16 (tl.arange needs a power of two, tl.dot at least 16)."""
    return max(16, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def launch(kernel: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           causal: bool = False, scale: float | None = None, block_q: int = 64,
           block_k: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``kernel`` (with :func:`flash_forward_kernel`'s signature) on q (..., L, D),
    k (..., S, D), v (..., S, Dv): out (..., L, Dv) in q's dtype, lse (..., L) in float32.

    ``block_q`` and ``block_k`` are rounded up to powers of two, at least 16. A kernel that
    still raises ``NotImplementedError`` (a notebook's unwritten stub) raises it here too.
    """
    scale = _checked_scale(q, k, v, scale, block_q, block_k)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the Triton kernel takes float16, bfloat16 or float32, got {q.dtype}")
    if q.device.type == "cpu" and not isinstance(kernel, InterpretedFunction):
        raise RuntimeError("CPU tensors need Triton's interpreter: set the environment "
                           "variable TRITON_INTERPRET=1 before the kernel is defined (before "
                           "helpers.flash_triton is imported), or move the tensors to a CUDA GPU")
    lead, (L, D), (S, Dv) = q.shape[:-2], q.shape[-2:], v.shape[-2:]
    # (heads, seq, dim) with a unit stride on the last dim, as the kernel indexes them
    q3, k3, v3 = (t.reshape(lead.numel(), *t.shape[-2:]).contiguous() for t in (q, k, v))
    heads = q3.shape[0]
    out = torch.empty(heads, L, Dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(heads, L, device=q.device, dtype=torch.float32)
    if heads and L:
        BLOCK_M, BLOCK_N = _block_size(block_q), _block_size(block_k)
        grid = (triton.cdiv(L, BLOCK_M), heads)
        try:
            kernel[grid](q3, k3, v3, out, lse,
                         q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1),
                         v3.stride(0), v3.stride(1), out.stride(0), out.stride(1),
                         L, S, D, Dv, scale,
                         CAUSAL=bool(causal), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                         BLOCK_D=_block_size(D), BLOCK_DV=_block_size(Dv))
        except Exception as error:  # Triton wraps what the kernel raised in its own errors
            if "NotImplementedError" in f"{error!r} {error.__cause__!r}":
                raise NotImplementedError(f"the kernel {getattr(kernel, '__name__', kernel)} "
                                          "is not written yet") from None
            raise
    return out.reshape(*lead, L, Dv), lse.reshape(*lead, L)


def flash_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           causal: bool = False, scale: float | None = None,
                           block_q: int = 64, block_k: int = 64
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention's forward by :func:`flash_forward_kernel`: out (..., L, Dv), lse (..., L).

    Same conventions as :func:`helpers.flash.flash_attention_forward` (bottom-right causal
    mask, zeros for a query that sees no key); forward only, no autograd.
    """
    return launch(flash_forward_kernel, q, k, v, causal, scale, block_q, block_k)
