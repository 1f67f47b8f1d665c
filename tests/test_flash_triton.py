"""The Triton FlashAttention kernel against PyTorch's SDPA: in Triton's interpreter on CPU
tensors (``TRITON_INTERPRET=1``, small sizes), compiled on a CUDA GPU when there is one.
Skipped, with the reason, when the optional ``triton`` extra is not installed."""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton is not installed: pip install "
                                         "'attention-course[triton]' to test the Triton kernel")

# (L, S, D, Dv, block_q, block_k): ragged blocks both ways, L != S both ways, D and Dv not
# powers of two, blocks larger than the sequence
SHAPES = [(7, 11, 6, 4, 16, 16), (40, 19, 8, 5, 16, 16), (19, 40, 20, 12, 32, 16),
          (33, 33, 16, 16, 16, 32)]


@pytest.fixture(scope="module")
def interpreted(request):
    """``helpers.flash_triton`` imported with TRITON_INTERPRET=1 (Triton reads it when a kernel
    is defined and again when it runs); the variable is restored after this module."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import helpers.flash_triton

    module = importlib.reload(helpers.flash_triton)
    yield module
    if saved is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = saved


def bottom_right(L: int, S: int) -> torch.Tensor:
    return torch.ones(L, S, dtype=torch.bool).tril(S - L)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES, ids=[f"L{s[0]}-S{s[1]}-D{s[2]}" for s in SHAPES])
@pytest.mark.parametrize("causal", [False, True])
def test_interpreted_kernel_matches_sdpa(interpreted, shape, causal):
    L, S, D, Dv, block_q, block_k = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, d, generator=g) for n, d in ((L, D), (S, D), (S, Dv)))
    mask = bottom_right(L, S) if causal else None
    out, lse = interpreted.flash_attention_triton(q, k, v, causal, None, block_q, block_k)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).nan_to_num(0.0)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    expected_lse = torch.logsumexp(scores, dim=-1)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)
    blind = torch.isneginf(expected_lse)
    assert bool(torch.isneginf(lse[blind]).all())
    torch.testing.assert_close(lse[~blind], expected_lse[~blind], atol=2e-6, rtol=1e-5)


@needs_triton
def test_scale_leading_dims_and_the_helpers_entry_point(interpreted):
    from helpers.flash import flash_attention_forward, flash_attention_triton

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(n, 3, 8, generator=g).transpose(0, 1)[None] for n in (20, 25, 25))
    out, lse = flash_attention_triton(q, k, v, causal=True, scale=0.3, block_q=16, block_k=16)
    expected, expected_lse = flash_attention_forward(q, k, v, causal=True, scale=0.3)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, expected_lse, atol=2e-6, rtol=1e-5)


@needs_triton
def test_an_unwritten_kernel_says_so(interpreted):
    import triton

    @triton.jit
    def stub(Q, K, V, O, LSE, stride_qh, stride_ql, stride_kh, stride_ks, stride_vh, stride_vs,
             stride_oh, stride_ol, L, S, D, DV, scale, CAUSAL: triton.language.constexpr,
             BLOCK_M: triton.language.constexpr, BLOCK_N: triton.language.constexpr,
             BLOCK_D: triton.language.constexpr, BLOCK_DV: triton.language.constexpr):
        raise NotImplementedError()

    q = torch.randn(1, 1, 4, 4)
    with pytest.raises(NotImplementedError, match="stub is not written yet"):
        interpreted.launch(stub, q, q, q)


@needs_triton
def test_float64_is_refused(interpreted):
    q = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32"):
        interpreted.flash_attention_triton(q, q, q)


@needs_triton
def test_cpu_tensors_without_the_interpreter_get_a_clear_error():
    """In a fresh process without TRITON_INTERPRET the kernel is compiled for a GPU: CPU
    tensors must get an error that names the variable."""
    script = textwrap.dedent("""
        import torch
        from helpers.flash import flash_attention_triton
        q = torch.randn(1, 1, 4, 4)
        try:
            flash_attention_triton(q, q, q)
        except RuntimeError as error:
            print(error)
    """)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert "TRITON_INTERPRET=1" in done.stdout, done.stdout + done.stderr


def test_missing_triton_names_the_extra(monkeypatch):
    import helpers
    import helpers.flash

    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now raises ImportError
    monkeypatch.delitem(sys.modules, "helpers.flash_triton", raising=False)
    monkeypatch.delattr(helpers, "flash_triton", raising=False)
    q = torch.randn(1, 1, 4, 4)
    with pytest.raises(ImportError, match=r"attention-course\[triton\]"):
        helpers.flash.flash_attention_triton(q, q, q)


@needs_triton
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernel_on_cuda():
    """A fresh process without the interpreter: the kernel compiles for the GPU."""
    script = textwrap.dedent("""
        import torch, torch.nn.functional as F
        from helpers.flash import flash_attention_triton
        for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
            q, k, v = (torch.randn(2, 4, n, 64, device="cuda", dtype=dtype) for n in (300, 333, 333))
            mask = torch.ones(300, 333, dtype=torch.bool, device="cuda").tril(33)
            for causal in (False, True):
                out, lse = flash_attention_triton(q, k, v, causal=causal)
                ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                     attn_mask=mask if causal else None)
                assert (out.float() - ref).abs().max().item() < tol, (dtype, causal)
        print("ok")
    """)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.stdout.strip().endswith("ok"), done.stdout + done.stderr
