"""The Triton FlashAttention kernel against PyTorch's SDPA: in Triton's interpreter on CPU
tensors (``TRITON_INTERPRET=1``, small sizes), compiled on a CUDA GPU when there is one.
Skipped, with the reason, when the optional ``triton`` extra is not installed.

Triton reads ``TRITON_INTERPRET`` when it is imported (its own library kernels are defined
then) and again when a kernel is defined and run, and other tests may import it first (torch
does, for its compiler): so the kernel runs in fresh processes, one for all the interpreter
cases, whose results the tests below read.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton is not installed: pip install "
                                         "'attention-course[triton]' to test the Triton kernel")

# (L, S, D, Dv, block_q, block_k): ragged blocks both ways, L != S both ways, D and Dv not
# powers of two, blocks larger than the sequence
SHAPES = [(7, 11, 6, 4, 16, 16), (40, 19, 8, 5, 16, 16), (19, 40, 20, 12, 32, 16),
          (33, 33, 16, 16, 16, 32)]

INTERPRETER_CASES = textwrap.dedent("""
    import json, math, os, sys
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch, torch.nn.functional as F
    import triton
    import triton.language as tl
    from helpers.flash import flash_attention_forward, flash_attention_triton
    from helpers.flash_triton import launch

    def errors(out, lse, expected, expected_lse):
        blind = torch.isneginf(expected_lse)
        return {"out": (out - expected).abs().max().item(),
                "lse": (lse[~blind] - expected_lse[~blind]).abs().max().item(),
                "blind_lse_is_minus_inf": bool(torch.isneginf(lse[blind]).all())}

    results = {}
    for L, S, D, Dv, block_q, block_k in json.loads(sys.argv[1]):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 2, n, d, generator=g) for n, d in ((L, D), (S, D), (S, Dv)))
        for causal in (False, True):
            mask = torch.ones(L, S, dtype=torch.bool).tril(S - L) if causal else None
            out, lse = flash_attention_triton(q, k, v, causal, None, block_q, block_k)
            expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).nan_to_num(0.0)
            scores = q @ k.transpose(-2, -1) / math.sqrt(D)
            if mask is not None:
                scores = scores.masked_fill(~mask, -math.inf)
            results[f"{L}-{S}-{D}-{causal}"] = errors(out, lse, expected,
                                                      torch.logsumexp(scores, -1))

    g = torch.Generator().manual_seed(1)  # non-contiguous, a given scale, via helpers.flash
    q, k, v = (torch.randn(n, 3, 8, generator=g).transpose(0, 1)[None] for n in (20, 25, 25))
    out, lse = flash_attention_triton(q, k, v, causal=True, scale=0.3, block_q=16, block_k=16)
    results["strided"] = errors(out, lse, *flash_attention_forward(q, k, v, True, 0.3))

    @triton.jit
    def stub(Q, K, V, O, LSE, stride_qh, stride_ql, stride_kh, stride_ks, stride_vh,
             stride_vs, stride_oh, stride_ol, L, S, D, DV, scale, CAUSAL: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_DV: tl.constexpr):
        raise NotImplementedError()

    for name, call in (("stub", lambda: launch(stub, q, k, v)),
                       ("float64", lambda: flash_attention_triton(q.double(), k.double(),
                                                                  v.double()))):
        try:
            call()
            results[name] = "no error"
        except Exception as error:
            results[name] = f"{type(error).__name__}: {error}"
    print(json.dumps(results))
""")


def run_python(script: str, *args: str) -> subprocess.CompletedProcess:
    """``python -c script args`` in a fresh process, without TRITON_INTERPRET from ours."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """The results of every interpreter case, from one fresh process."""
    done = run_python(INTERPRETER_CASES, json.dumps(SHAPES))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize("shape", SHAPES, ids=[f"L{s[0]}-S{s[1]}-D{s[2]}" for s in SHAPES])
@pytest.mark.parametrize("causal", [False, True])
def test_interpreted_kernel_matches_sdpa(interpreted, shape, causal):
    L, S, D = shape[:3]
    result = interpreted[f"{L}-{S}-{D}-{causal}"]
    assert result["out"] < 2e-6 and result["lse"] < 2e-6, result
    assert result["blind_lse_is_minus_inf"], result  # a query that sees no key (L > S)


@needs_triton
def test_strided_inputs_and_scale_match_helpers_flash(interpreted):
    assert interpreted["strided"]["out"] < 2e-6 and interpreted["strided"]["lse"] < 2e-6


@needs_triton
def test_an_unwritten_kernel_says_so(interpreted):
    assert interpreted["stub"] == "NotImplementedError: the kernel stub is not written yet"


@needs_triton
def test_float64_is_refused(interpreted):
    assert interpreted["float64"].startswith("TypeError") and "float32" in interpreted["float64"]


@needs_triton
def test_cpu_tensors_without_the_interpreter_get_a_clear_error():
    """Without TRITON_INTERPRET the kernel is compiled for a GPU: CPU tensors must get an
    error that names the variable."""
    script = textwrap.dedent("""
        import torch
        from helpers.flash import flash_attention_triton
        q = torch.randn(1, 1, 4, 4)
        try:
            flash_attention_triton(q, q, q)
        except RuntimeError as error:
            print(error)
    """)
    done = run_python(script)
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
    done = run_python(script)
    assert done.stdout.strip().endswith("ok"), done.stdout + done.stderr
