"""helpers.flash's FlashAttention against oracles nobody here wrote: PyTorch's
``scaled_dot_product_attention`` (with ``causal_lower_right`` for the bottom-right mask),
``torch.logsumexp``, autograd through materialised attention, and ``gradcheck``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from helpers.device import one_cpu_thread
from helpers.flash import (FlashAttention, causal_block_counts, flash_attention,
                           flash_attention_backward, flash_attention_forward,
                           flash_attention_reference, hbm_accesses)

# (lead, L, S, D, Dv, block_q, block_k): L != S both ways, ragged last blocks, blocks larger
# than the sequence, a single query (decode), one key, no batch dim and three leading dims
SHAPES = [((2, 3), 13, 29, 8, 5, 4, 7), ((2, 3), 29, 13, 8, 5, 7, 4),
          ((1, 2), 9, 11, 6, 6, 64, 64), ((3,), 1, 17, 4, 3, 1, 5), ((2, 1), 6, 1, 5, 2, 4, 2),
          ((2, 2, 2), 21, 21, 3, 7, 5, 8)]
IDS = [f"L{s[1]}-S{s[2]}-b{s[5]}x{s[6]}" for s in SHAPES]


def qkv(lead, L, S, D, Dv, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*lead, n, d, generator=g, dtype=torch.float64)
               for n, d in ((L, D), (S, D), (S, Dv)))
    return tuple(t.to(device, dtype) for t in (q, k, v))


def bottom_right(L: int, S: int, device="cpu") -> torch.Tensor:
    """PyTorch's own bottom-right causal mask, materialised: (L, S) bool."""
    import warnings

    with warnings.catch_warnings():  # PyTorch warns that SDPA gives NaN rows when L > S
        warnings.simplefilter("ignore")
        return causal_lower_right(L, S)._materialize(device)


def expected(q, k, v, causal, scale=None):
    """out from SDPA (zeros where a query sees no key) and the logsumexp of the scores."""
    mask = bottom_right(q.shape[-2], k.shape[-2], q.device) if causal else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).nan_to_num(0.0)
    scores = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return out, torch.logsumexp(scores, dim=-1)


def assert_close(actual, target, tol):
    torch.testing.assert_close(actual.double(), target.double(), atol=tol, rtol=tol,
                               equal_nan=False)


# --- forward ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("forward", [flash_attention_forward, flash_attention_reference])
def test_forward_matches_sdpa(shape, causal, forward):
    lead, L, S, D, Dv, block_q, block_k = shape
    q, k, v = qkv(lead, L, S, D, Dv)
    out, lse = forward(q, k, v, causal=causal, block_q=block_q, block_k=block_k)
    out_true, lse_true = expected(q, k, v, causal)
    assert out.shape == (*lead, L, Dv) and lse.shape == (*lead, L)
    assert_close(out, out_true, 1e-12)
    assert_close(lse, lse_true, 1e-12)  # -inf exactly where the query sees no key


def test_causal_with_more_queries_than_keys_gives_zeros_not_nan():
    q, k, v = qkv((2, 2), 12, 5, 4, 3)
    out, lse = flash_attention_forward(q, k, v, causal=True, block_q=4, block_k=2)
    assert bool((out[..., :7, :] == 0).all()) and bool(torch.isneginf(lse[..., :7]).all())
    assert bool(torch.isfinite(out).all())


def test_scale_and_float32():
    q, k, v = qkv((2, 3), 33, 47, 16, 8, dtype=torch.float32)
    for causal in (False, True):
        out, lse = flash_attention_forward(q, k, v, causal=causal, scale=0.3, block_q=8, block_k=16)
        out_true, lse_true = expected(q.double(), k.double(), v.double(), causal, scale=0.3)
        assert out.dtype == torch.float32 and lse.dtype == torch.float32
        assert_close(out, out_true, 1e-5)
        assert_close(lse, lse_true, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_computes_in_float32(dtype):
    q, k, v = qkv((1, 2), 20, 30, 8, 8)
    out, lse = flash_attention_forward(*(t.to(dtype) for t in (q, k, v)), causal=True,
                                       block_q=8, block_k=8)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, expected(q, k, v, True)[0], 2e-2)


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, n, 3, 8, generator=g, dtype=torch.float64).transpose(1, 2)
               for n in (10, 14, 14))
    out, _ = flash_attention_forward(q, k, v, causal=True, block_q=3, block_k=5)
    assert_close(out, expected(q, k, v, True)[0], 1e-12)


def test_empty_sequences():
    q, k, v = qkv((2,), 4, 0, 3, 2)
    out, lse = flash_attention_forward(q, k, v)
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())
    q, k, v = qkv((2,), 0, 4, 3, 2)
    out, lse = flash_attention_forward(q, k, v, causal=True)
    assert out.shape == (2, 0, 2) and lse.shape == (2, 0)


def test_bad_inputs_raise_readable_errors():
    q, k, v = qkv((2,), 4, 5, 3, 2)
    with pytest.raises(ValueError, match="must share D"):
        flash_attention_forward(q, k[..., :2], v)
    with pytest.raises(ValueError, match="leading dims"):
        flash_attention_forward(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="block_q and block_k"):
        flash_attention_forward(q, k, v, block_q=0)


# --- the causal block schedule ----------------------------------------------------------------

@pytest.mark.parametrize("L, S, block_q, block_k", [(16, 16, 4, 4), (7, 23, 3, 5), (23, 7, 5, 3),
                                                    (40, 56, 8, 8), (5, 5, 8, 8), (9, 3, 2, 2)])
def test_skipped_blocks_are_exactly_the_invisible_ones(L, S, block_q, block_k):
    mask = bottom_right(L, S)
    invisible = sum(1 for i in range(0, L, block_q) for j in range(0, S, block_k)
                    if not bool(mask[i:i + block_q, j:j + block_k].any()))
    total = math.ceil(L / block_q) * math.ceil(S / block_k)
    counts = causal_block_counts(L, S, block_q, block_k)
    assert counts.skipped == invisible and counts.computed == total - invisible


@pytest.mark.parametrize("forward", [flash_attention_forward, flash_attention_reference])
def test_skipped_blocks_are_never_computed(forward):
    """PyTorch's FLOP counter sees the products of exactly the tiles that have a visible pair."""
    from torch.utils.flop_counter import FlopCounterMode

    L, S, D, Dv, block_q, block_k = 23, 37, 4, 3, 5, 4
    q, k, v = qkv((2, 3), L, S, D, Dv)
    mask = bottom_right(L, S)
    needed = sum(2 * mask[i:i + block_q, j:j + block_k].numel() * (D + Dv) * 6
                 for i in range(0, L, block_q) for j in range(0, S, block_k)
                 if bool(mask[i:i + block_q, j:j + block_k].any()))
    counter = FlopCounterMode(display=False)
    with counter:
        forward(q, k, v, causal=True, block_q=block_q, block_k=block_k)
    assert counter.get_total_flops() == needed


# --- backward ---------------------------------------------------------------------------------

# SDPA's autograd gives NaN for queries that see no key (causal, L > S): those cases are
# tested against masked scores in test_backward_with_queries_that_see_no_key.
BACKWARD_CASES = [pytest.param(shape, causal, id=f"{name}-{'causal' if causal else 'full'}")
                  for shape, name in zip(SHAPES, IDS) for causal in (False, True)
                  if not (causal and shape[1] > shape[2])]


@pytest.mark.parametrize("shape, causal", BACKWARD_CASES)
def test_backward_matches_autograd_through_sdpa(shape, causal):
    lead, L, S, D, Dv, block_q, block_k = shape
    q, k, v = (t.requires_grad_() for t in qkv(lead, L, S, D, Dv, seed=1))
    mask = bottom_right(L, S) if causal else None
    dout = torch.randn(*lead, L, Dv, dtype=torch.float64)
    grads_true = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                     (q, k, v), dout)
    out = flash_attention(q, k, v, causal=causal, block_q=block_q, block_k=block_k)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for grad, grad_true in zip(grads, grads_true):
        assert_close(grad, grad_true, 1e-12)


def test_backward_with_queries_that_see_no_key():
    """L > S causal: autograd through masked scores whose blind rows are dropped."""
    q, k, v = (t.requires_grad_() for t in qkv((2, 2), 11, 6, 4, 3, seed=2))
    mask = bottom_right(11, 6)
    scores = (q @ k.transpose(-2, -1) / 2).masked_fill(~mask, -math.inf)
    sees = mask.any(-1)  # (L,)
    weights = torch.softmax(scores[..., sees, :], dim=-1)
    dout = torch.randn(2, 2, 11, 3, dtype=torch.float64)
    loss_true = (weights @ v * dout[..., sees, :]).sum()
    grads_true = torch.autograd.grad(loss_true, (q, k, v))
    grads = torch.autograd.grad((flash_attention(q, k, v, causal=True, block_q=3, block_k=2)
                                 * dout).sum(), (q, k, v))
    for grad, grad_true in zip(grads, grads_true):
        assert_close(grad, grad_true, 1e-12)


def test_gradient_of_the_logsumexp_too():
    q, k, v = (t.requires_grad_() for t in qkv((2,), 7, 9, 4, 3, seed=4))
    out, lse = flash_attention_forward(q, k, v, causal=True, block_q=3, block_k=4)
    weight = torch.randn(2, 7, dtype=torch.float64)
    grads = torch.autograd.grad((out.sum(-1) + lse * weight).sum(), (q, k, v))
    scores = (q @ k.transpose(-2, -1) / 2).masked_fill(~bottom_right(7, 9), -math.inf)
    out_true = torch.softmax(scores, -1) @ v
    grads_true = torch.autograd.grad((out_true.sum(-1) + torch.logsumexp(scores, -1) * weight).sum(),
                                     (q, k, v))
    for grad, grad_true in zip(grads, grads_true):
        assert_close(grad, grad_true, 1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(causal):
    q, k, v = (t.requires_grad_() for t in qkv((1, 2), 5, 7, 3, 2, seed=5))
    assert torch.autograd.gradcheck(
        lambda q, k, v: flash_attention_forward(q, k, v, causal, 0.7, 2, 3), (q, k, v))


def test_a_second_derivative_raises_instead_of_lying():
    q, k, v = (t.requires_grad_() for t in qkv((1, 2), 4, 5, 3, 3, seed=5))
    (grad,) = torch.autograd.grad(flash_attention(q, k, v).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_backward_never_builds_an_l_by_s_matrix():
    """The recomputation backward works on (block_q, block_k) tiles: record every tensor the
    backward creates and check that none is as large as one head's (L, S) weights."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in result if isinstance(result, (tuple, list)) else [result]:
                if isinstance(t, torch.Tensor):
                    Largest.largest = max(Largest.largest, t.shape[-2:].numel() if t.dim() >= 2 else 0)
            return result

    q, k, v = (t.requires_grad_() for t in qkv((1, 2), 64, 80, 4, 4, seed=6))
    out = flash_attention(q, k, v, causal=True, block_q=16, block_k=16)
    with one_cpu_thread(), Largest():  # the mode sees this thread: no worker threads
        out.sum().backward()
    assert Largest.largest <= 80 * 4  # k's (S, D) is the largest; a tile is 16 x 16


@pytest.mark.parametrize("causal", [False, True])
def test_worker_threads_give_the_same_result(causal):
    """On the CPU the blocks run on a pool of threads, one per torch thread: the forward is
    bit for bit the same with 1 or 3 threads, the backward (dq summed per thread) equal."""
    q, k, v = (t.requires_grad_() for t in qkv((2, 2), 45, 38, 8, 5, seed=8))
    results, before = [], torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            out, lse = flash_attention_forward(q, k, v, causal=causal, block_q=8, block_k=8)
            results.append((out, lse, *torch.autograd.grad((out.square().sum() + lse.sum()),
                                                           (q, k, v))))
            assert torch.get_num_threads() == threads  # given back after the pool
    finally:
        torch.set_num_threads(before)
    (out_1, lse_1, *grads_1), (out_3, lse_3, *grads_3) = results
    assert torch.equal(out_1, out_3) and torch.equal(lse_1, lse_3)
    for grad_1, grad_3 in zip(grads_1, grads_3):
        assert_close(grad_1, grad_3, 1e-12)


def test_backward_function_directly():
    q, k, v = qkv((2, 3), 13, 29, 8, 5, seed=7)
    out, lse = flash_attention_reference(q, k, v, block_q=4, block_k=7)
    dout = torch.randn_like(out)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grads_true = torch.autograd.grad(F.scaled_dot_product_attention(*leaves), leaves, dout)
    for grad, grad_true in zip(flash_attention_backward(q, k, v, out, lse, dout, block_q=5,
                                                        block_k=3), grads_true):
        assert_close(grad, grad_true, 1e-12)


def test_the_function_saves_no_quadratic_tensor():
    q, k, v = (t.requires_grad_() for t in qkv((1, 1), 50, 60, 4, 4))
    out, lse = FlashAttention.apply(q, k, v, True, None, 16, 16)
    assert max(t.numel() for t in out.grad_fn.saved_tensors) == 60 * 4


# --- the IO model -----------------------------------------------------------------------------

def test_hbm_model_counts_what_the_loops_move():
    """Count the elements of each load and store in the two algorithms, written as loops."""
    L, S, D, Dv, block_q = 100, 70, 16, 8, 32
    standard = (L * D + S * D) + L * S + (L * S + L * S) + (L * S + S * Dv) + L * Dv
    tiled = 0
    for start in range(0, L, block_q):
        rows = min(block_q, L - start)
        tiled += rows * D + S * D + S * Dv + rows * Dv + rows  # Q_i, every K_j, V_j, O_i, lse_i
    assert tuple(hbm_accesses(L, S, D, Dv, block_q)) == (standard, tiled)


# --- on a GPU -------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_forward_and_backward(dtype):
    q, k, v = (t.requires_grad_() for t in qkv((2, 3), 70, 90, 16, 16, dtype=dtype,
                                              device="cuda"))
    out = flash_attention(q, k, v, causal=True, block_q=32, block_k=32)
    assert out.device.type == "cuda" and out.dtype == dtype
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                         attn_mask=bottom_right(70, 90, "cuda"))
    assert_close(out, ref, 1e-5 if dtype == torch.float32 else 2e-3)
    out.float().sum().backward()
    assert q.grad.device.type == "cuda" and bool(torch.isfinite(q.grad).all())
