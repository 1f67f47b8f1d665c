"""Hidden tests for lesson 06 (FlashAttention): fresh shapes, block sizes, dtypes and seeds,
references from a private copy of ``helpers``, no shortcut through ``helpers.flash`` or
PyTorch's attention, and watchers that fail an answer which builds the (L, S) matrix,
computes the tiles it claims to skip, or asks autograd for the gradients it should derive.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from helpers import attention as attention_reference
from helpers import flash as reference
from helpers.checks.lesson06 import (AutogradWatch, TileWatch, matmul_flops, run_function,
                                     softmax_state, tile_flops)
from helpers.hidden._core import HiddenTestFailed, expect_close, forbid, randn, random_seed

DTYPES = (torch.float32, torch.float64)
TOLERANCES = {torch.float32: {"atol": 1e-5, "rtol": 1e-4},
              torch.float64: {"atol": 1e-10, "rtol": 1e-8}}
# every road to the course's own attention: the fast forward (flash_attention_forward,
# flash_attention, FlashAttention) all run _forward and _tiled_forward. FlashAttention itself
# is not named: its backward's code is once_differentiable's wrapper, which any other
# once_differentiable backward (a student's) runs too
FLASH_HELPERS = ["helpers.flash.block_attention", "helpers.flash.merge_attention",
                 "helpers.flash.block_attention_backward", "helpers.flash.flash_attention_reference",
                 "helpers.flash._tiled_forward", "helpers.flash.flash_attention_backward",
                 "helpers.flash.flash_attention_triton"]
ATTENTION_HELPERS = ["helpers.attention.scaled_dot_product_attention",
                     "helpers.attention.MultiHeadAttention"]
ATTENTION_FUNCTIONS = ["scaled_dot_product_attention", "multi_head_attention_forward"]


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """An integer in low .. high inclusive."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _ragged(generator: torch.Generator, block: int, low: int, high: int) -> int:
    """A length in low .. high that is not a multiple of ``block`` (a ragged last block)."""
    while True:
        n = _randint(generator, low, high)
        if n % block:
            return n


def _run(student: Callable, *args: object, what: str, **kwargs: object) -> object:
    """The student's answer; an error inside it becomes a failure that names the call."""
    try:
        return student(*args, **kwargs)
    except HiddenTestFailed:
        raise
    except Exception as error:
        raise HiddenTestFailed(f"{what}: raised {type(error).__name__}: {error}") from None


def _expect_dtype(value: object, dtype: torch.dtype, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise HiddenTestFailed(f"{what}: expected a tensor, got {type(value).__name__}")
    if value.dtype != dtype:
        raise HiddenTestFailed(f"{what}: dtype {value.dtype}, expected {dtype}")
    return value


def _expect_tuple(value: object, length: int, what: str) -> tuple:
    if not (isinstance(value, tuple) and len(value) == length):
        raise HiddenTestFailed(f"{what}: expected a tuple of {length}, got {type(value).__name__}")
    return value


def _oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
            causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """out and logsumexp in float64: the course's materialised attention (lesson 02) and the
    logsumexp of the scaled, masked scores, computed with plain tensor arithmetic."""
    q, k, v = q.double(), k.double(), v.double()
    L, S = q.shape[-2], k.shape[-2]
    mask = attention_reference.causal_mask(L, S, device=q.device) if causal else None
    out = attention_reference.scaled_dot_product_attention(q, k, v, mask=mask, scale=scale)[0]
    scores = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    return out, (scores - m).exp().sum(-1).log() + m[..., 0]  # -inf where nothing is seen


def _expect_lse(lse: torch.Tensor, expected: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    blind = torch.isneginf(expected)
    got = lse.detach().double().cpu()
    if not bool(torch.isneginf(got[blind.cpu()]).all()):
        raise HiddenTestFailed(f"{what}: lse of a query that sees no key should be -inf")
    expect_close(got.masked_fill(blind.cpu(), 0.0), expected.masked_fill(blind, 0.0), what,
                 **TOLERANCES[dtype])


def _watched(student: Callable, args: tuple, kwargs: dict, L: int, S: int, lead: int,
             what: str) -> object:
    """Run the answer under :class:`TileWatch` (inside a :func:`forbid` block)."""
    watch = TileWatch(L, S, lead)
    with watch:
        result = _run(student, *args, what=what, **kwargs)
    message = watch.message(what)
    if message:
        raise HiddenTestFailed(message)
    return result


# --- exercise 1 -----------------------------------------------------------------------------

def hbm_accesses(student: Callable) -> None:
    """Element counts for random sizes with a ragged last query block and D != Dv."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(3):
        block_q = _randint(generator, 2, 256)
        L = _ragged(generator, block_q, block_q + 1, 20 * block_q)  # >= 2 blocks, ragged
        S, D = _randint(generator, 1, 5000), _randint(generator, 1, 256)
        Dv = D + _randint(generator, 1, 64)
        what = f"hbm_accesses(L={L}, S={S}, D={D}, Dv={Dv}, block_q={block_q}), seed {seed}"
        with forbid(helpers=["helpers.flash.hbm_accesses"]):
            result = _expect_tuple(_run(student, L, S, D, Dv, block_q, what=what), 2, what)
        expected = tuple(reference.hbm_accesses(L, S, D, Dv, block_q))
        if tuple(int(x) for x in result) != expected or not all(isinstance(x, int) for x in result):
            raise HiddenTestFailed(f"{what}: got {result}, expected integers {expected}")


# --- exercise 2 -----------------------------------------------------------------------------

def merge_softmax_states(student: Callable) -> None:
    """Random states with different maxima, some rows empty on one side or both."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    for dtype in DTYPES:
        n = {name: _randint(generator, *bounds) for name, bounds in
             {"B": (1, 3), "L": (4, 9), "n_a": (1, 8), "n_b": (1, 8), "Dv": (1, 6)}.items()}
        spread, offset = 1 + 4 * float(torch.rand((), generator=generator)), _randint(generator, -50, 50)
        s_a = randn(generator, n["B"], n["L"], n["n_a"], dtype=torch.float64) * spread + offset
        s_b = randn(generator, n["B"], n["L"], n["n_b"], dtype=torch.float64) * spread + offset + 3
        s_a[:, 0], s_b[:, 1], s_a[:, 2], s_b[:, 2] = -math.inf, -math.inf, -math.inf, -math.inf
        v_a = randn(generator, n["B"], n["n_a"], n["Dv"], dtype=torch.float64)
        v_b = randn(generator, n["B"], n["n_b"], n["Dv"], dtype=torch.float64)
        a, b = softmax_state(s_a, v_a), softmax_state(s_b, v_b)
        what = f"merge_softmax_states, {n}, {dtype}, seed {seed}"
        with forbid(helpers=FLASH_HELPERS):
            result = _expect_tuple(_run(student, *(x.to(dtype) for x in (*a, *b)), what=what),
                                   3, what)
        expected = softmax_state(torch.cat([s_a, s_b], -1), torch.cat([v_a, v_b], -2))
        for name, value, target in zip(("m", "l", "acc"), result, expected):
            value = _expect_dtype(value, dtype, f"{what}: {name}")
            if bool(torch.isnan(value).any()):
                raise HiddenTestFailed(f"{what}: NaN in {name} (two empty states, m = -inf?)")
            blind = torch.isneginf(target)
            expect_close(value.masked_fill(blind, 0), target.masked_fill(blind, 0),
                         f"{what}: {name}", **TOLERANCES[dtype])
        if not bool(torch.isneginf(result[0][:, 2]).all()):
            raise HiddenTestFailed(f"{what}: two empty states should merge into m = -inf")


# --- exercises 3 and 4: the forward ----------------------------------------------------------

def _forward_sizes(generator: torch.Generator, causal: bool, longer_keys: bool
                   ) -> dict[str, int]:
    """Sizes with ragged blocks, L != S, and L, S > max(D, Dv) so that the watch is fair;
    for causal inputs, at least two skipped tiles."""
    while True:
        n = {name: _randint(generator, *bounds) for name, bounds in
             {"B": (1, 2), "H": (1, 3), "D": (2, 8), "Dv": (1, 8), "block_q": (4, 8),
              "block_k": (4, 8)}.items()}
        n["L"] = _ragged(generator, n["block_q"], 10, 26)
        n["S"] = _ragged(generator, n["block_k"], 10, 26)
        if n["L"] == n["S"] or (n["L"] < n["S"]) != longer_keys:
            continue
        if causal and reference.causal_block_counts(n["L"], n["S"], n["block_q"],
                                                    n["block_k"]).skipped < 2:
            continue
        return n


def _forward_inputs(generator: torch.Generator, n: dict[str, int], dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lead = (n["B"], n["H"])
    return (randn(generator, *lead, n["L"], n["D"], dtype=dtype),
            randn(generator, *lead, n["S"], n["D"], dtype=dtype),
            randn(generator, *lead, n["S"], n["Dv"], dtype=dtype))


FORWARD_FORBIDDEN = {"torch_functions": ATTENTION_FUNCTIONS,
                     "helpers": FLASH_HELPERS + ATTENTION_HELPERS}


def tiled_attention(student: Callable) -> None:
    """out and lse for random shapes and blocks, a given scale, and a block larger than the
    sequence; never an (L, S) tensor."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    cases = []  # (what, dtype, inputs, options, watched)
    for dtype, longer_keys in zip(DTYPES, (True, False)):
        n = _forward_sizes(generator, causal=False, longer_keys=longer_keys)
        q, k, v = _forward_inputs(generator, n, dtype)
        scale = 0.1 + float(torch.rand((), generator=generator))
        for options, watched in (({"block_q": n["block_q"], "block_k": n["block_k"]}, True),
                                 ({"block_q": n["block_k"], "block_k": n["block_q"],
                                   "scale": scale}, True),
                                 ({"block_q": n["L"] + 5, "block_k": n["S"] + 5}, False)):
            cases.append((f"tiled_attention, {n}, {options}, {dtype}, seed {seed}", dtype, n,
                          (q, k, v), options, watched))
    with forbid(**FORWARD_FORBIDDEN):
        results = [_watched(student, inputs, options, n["L"], n["S"], n["B"] * n["H"], what)
                   if watched else _run(student, *inputs, what=what, **options)
                   for what, dtype, n, inputs, options, watched in cases]
    for (what, dtype, n, inputs, options, _), result in zip(cases, results):
        out, lse = _expect_tuple(result, 2, what)
        expected_out, expected_lse = _oracle(*inputs, options.get("scale"), causal=False)
        expect_close(_expect_dtype(out, dtype, what), expected_out, f"{what}: out",
                     **TOLERANCES[dtype])
        _expect_lse(_expect_dtype(lse, dtype, what), expected_lse, f"{what}: lse", dtype)


def causal_tiled_attention(student: Callable) -> None:
    """Bottom-right causal attention for L < S and L > S (blind queries): out, lse, the
    number of skipped tiles, and the FLOPs that show the tiles were really skipped."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for dtype, longer_keys in zip(DTYPES, (True, False)):
        n = _forward_sizes(generator, causal=True, longer_keys=longer_keys)
        cases.append((f"causal_tiled_attention, {n}, {dtype}, seed {seed}", dtype, n,
                      _forward_inputs(generator, n, dtype)))
    results = []
    with forbid(**FORWARD_FORBIDDEN):
        for what, dtype, n, inputs in cases:
            blocks = {"block_q": n["block_q"], "block_k": n["block_k"]}
            results.append(matmul_flops(lambda: _watched(student, inputs, blocks, n["L"], n["S"],
                                                         n["B"] * n["H"], what)))
    for (what, dtype, n, inputs), (result, flops) in zip(cases, results):
        out, lse, n_skipped = _expect_tuple(result, 3, what)
        expected_out, expected_lse = _oracle(*inputs, None, causal=True)
        expect_close(_expect_dtype(out, dtype, what), expected_out, f"{what}: out",
                     **TOLERANCES[dtype])
        _expect_lse(_expect_dtype(lse, dtype, what), expected_lse, f"{what}: lse", dtype)
        counts = reference.causal_block_counts(n["L"], n["S"], n["block_q"], n["block_k"])
        try:
            skipped = int(n_skipped)
        except (TypeError, ValueError, RuntimeError):
            raise HiddenTestFailed(f"{what}: n_skipped should be an integer, got "
                                   f"{type(n_skipped).__name__}") from None
        if skipped != counts.skipped:
            raise HiddenTestFailed(f"{what}: n_skipped = {skipped}, expected {counts.skipped}")
        sizes = (n["L"], n["S"], n["D"], n["Dv"], n["block_q"], n["block_k"], n["B"] * n["H"])
        every, needed = tile_flops(*sizes, causal=False), tile_flops(*sizes, causal=True)
        if flops >= (every + needed) / 2:
            raise HiddenTestFailed(f"{what}: {flops:,} FLOPs of matrix products where skipping "
                                   f"the tiles above the diagonal needs {needed:,}: tiles that "
                                   "are reported skipped were computed")


# --- exercise 5: the backward -----------------------------------------------------------------

def tiled_attention_backward(student: Callable) -> None:
    """dq, dk, dv against autograd through materialised attention, for random shapes and
    blocks; no autograd, no (L, S) tensor."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    dtype = torch.float64  # gradients compared tightly
    cases = []
    for longer_keys in (True, False):
        n = _forward_sizes(generator, causal=False, longer_keys=longer_keys)
        while n["Dv"] == n["D"]:  # dk and dv must not be interchangeable
            n["Dv"] = _randint(generator, 1, 8)
        q, k, v = _forward_inputs(generator, n, dtype)
        dout = randn(generator, n["B"], n["H"], n["L"], n["Dv"], dtype=dtype)
        scale = None if longer_keys else 0.1 + float(torch.rand((), generator=generator))
        out, lse = _oracle(q, k, v, scale, causal=False)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        expected = attention_reference.scaled_dot_product_attention(*leaves, scale=scale)[0]
        options = {"block_q": n["block_q"], "block_k": n["block_k"]}
        if scale is not None:
            options["scale"] = scale
        cases.append((f"tiled_attention_backward, {n}, scale {scale}, seed {seed}", n,
                      (q, k, v, out, lse, dout), options,
                      torch.autograd.grad(expected, leaves, dout)))
    autograd = AutogradWatch()
    with forbid(**FORWARD_FORBIDDEN), autograd:
        results = [_watched(student, inputs, options, n["L"], n["S"], n["B"] * n["H"], what)
                   for what, n, inputs, options, _ in cases]
    if autograd.used:
        raise HiddenTestFailed(f"tiled_attention_backward, seed {seed}: the answer calls "
                               "torch.autograd: this exercise asks for the gradients from "
                               "their formulas")
    for (what, _, _, _, expected), result in zip(cases, results):
        for name, value, target in zip(("dq", "dk", "dv"), _expect_tuple(result, 3, what),
                                       expected):
            expect_close(_expect_dtype(value, dtype, f"{what}: {name}"), target,
                         f"{what}: {name}", **TOLERANCES[dtype])


# --- exercise 6: the autograd.Function -----------------------------------------------------

def flash_function(student: object) -> None:
    """Output and gradients of ``FlashAttention.apply`` against autograd through materialised
    attention, causal (L < S and L > S) and not; no (L, S) tensor saved or built."""
    if not (isinstance(student, type) and issubclass(student, torch.autograd.Function)):
        raise HiddenTestFailed("FlashAttention should subclass torch.autograd.Function")
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    dtype = torch.float64
    for causal, longer_keys in ((None, True), (True, True), (True, False)):
        B, H = _randint(generator, 1, 2), _randint(generator, 1, 2)
        D, Dv = _randint(generator, 2, 8), _randint(generator, 1, 8)
        L, S = _randint(generator, 65, 90), _randint(generator, 65, 90)
        L, S = (min(L, S) - 1, max(L, S) + 1) if longer_keys else (max(L, S) + 1, min(L, S) - 1)
        q, k, v = (randn(generator, B, H, n, d, dtype=dtype) for n, d in ((L, D), (S, D), (S, Dv)))
        dout = randn(generator, B, H, L, Dv, dtype=dtype)
        what = f"FlashAttention, B={B}, H={H}, L={L}, S={S}, D={D}, Dv={Dv}, causal={causal}, " \
               f"seed {seed}"
        watch = TileWatch(L, S, B * H)
        with forbid(torch_functions=ATTENTION_FUNCTIONS,
                    helpers=["helpers.flash._forward", "helpers.flash.flash_attention",
                             "helpers.flash.flash_attention_forward", *ATTENTION_HELPERS]), watch:
            try:
                out, grads, grad_fn, saved = run_function(student, q, k, v, dout, causal, what)
            except AssertionError as error:  # the visible check's CheckFailed
                raise HiddenTestFailed(str(error)) from None
            except Exception as error:
                raise HiddenTestFailed(f"{what}: raised {type(error).__name__}: {error}") from None
        if watch.message(what):
            raise HiddenTestFailed(watch.message(what))
        if not isinstance(grad_fn, torch.autograd.function.BackwardCFunction):
            raise HiddenTestFailed(f"{what}: the output does not come from the Function's forward")
        if saved is not None:
            raise HiddenTestFailed(f"{what}: the Function keeps a tensor of shape {saved}, as "
                                   "large as the (L, S) weights")
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        mask = attention_reference.causal_mask(L, S, device=q.device) if causal else None
        expected = attention_reference.scaled_dot_product_attention(*leaves, mask=mask)[0]
        expected_grads = torch.autograd.grad(expected, leaves, dout)
        expect_close(out, expected, f"{what}: out", **TOLERANCES[dtype])
        for name, value, target in zip(("dq", "dk", "dv"), grads, expected_grads):
            if value is None:
                raise HiddenTestFailed(f"{what}: no gradient for {name[1:]}")
            expect_close(value, target, f"{what}: {name}", **TOLERANCES[dtype])
