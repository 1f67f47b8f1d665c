"""Hidden tests for lesson 02: fresh shapes, dtypes and seeds, references from a private copy
of ``helpers``, and no shortcut through the function the exercise asks for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from helpers import attention as reference
from helpers.hidden._core import HiddenTestFailed, expect_close, forbid, randn, random_seed, sizes

DTYPES = (torch.float32, torch.float64)
TOLERANCES = {torch.float32: {"atol": 1e-5, "rtol": 1e-4},
              torch.float64: {"atol": 1e-10, "rtol": 1e-9}}
SOFTMAX_FUNCTIONS = ["softmax", "log_softmax", "_softmax", "_log_softmax", "softmin"]
ENTROPY_FUNCTIONS = ["entr", "special_entr", "xlogy", "special_xlogy"]
ATTENTION_FUNCTIONS = ["scaled_dot_product_attention", "multi_head_attention_forward"]
ATTENTION_HELPERS = ["helpers.attention.scaled_dot_product_attention",
                     "helpers.attention.MultiHeadAttention"]


def _expect_dtype(value: object, dtype: torch.dtype, what: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise HiddenTestFailed(f"{what}: expected a tensor, got {type(value).__name__}")
    if value.dtype != dtype:
        raise HiddenTestFailed(f"{what}: dtype {value.dtype}, expected {dtype}")


def dot_scores(student: Callable) -> None:
    """Raw scores (B, H, L, S) for random shapes, in float32 and float64."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    for dtype in DTYPES:
        # S >= 2: with L = S = 1, k qᵀ equals q kᵀ; D >= 2: with d_k = 1, scores divided by
        # √d_k equal the raw ones
        n = sizes(generator, B=(1, 3), H=(1, 4), L=(1, 9), S=(2, 11), D=(2, 40))
        q = randn(generator, n["B"], n["H"], n["L"], n["D"], dtype=dtype)
        k = randn(generator, n["B"], n["H"], n["S"], n["D"], dtype=dtype)
        with forbid(torch_functions=ATTENTION_FUNCTIONS, helpers=ATTENTION_HELPERS):
            scores = student(q, k)
        what = f"dot_scores, {n}, {dtype}, seed {seed}"
        _expect_dtype(scores, dtype, what)
        expected = (q.double()[..., :, None, :] * k.double()[..., None, :, :]).sum(-1)
        expect_close(scores, expected, what, **TOLERANCES[dtype])
    other = randn(generator, 1, 1, 2, n["D"] + 1, dtype=dtype)  # a last dim that differs
    try:
        student(q, other)
    except ValueError as error:
        if str(q.shape[-1]) not in str(error) or str(other.shape[-1]) not in str(error):
            raise HiddenTestFailed(f"dot_scores: the ValueError for shapes {tuple(q.shape)} "
                                   f"and {tuple(other.shape)} should name both, it says "
                                   f"{error!r} (seed {seed})") from None
    except Exception as error:  # noqa: BLE001 - any other error is the wrong one
        raise HiddenTestFailed(f"dot_scores: k with another last dim raised "
                               f"{type(error).__name__}, expected ValueError (seed {seed})"
                               ) from None
    else:
        raise HiddenTestFailed(f"dot_scores: k with another last dim should raise ValueError "
                               f"(seed {seed})")


def stable_softmax(student: Callable) -> None:
    """Large, -inf and fully masked logits along the last and a random dim; no torch softmax."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    for dtype in DTYPES:
        n = sizes(generator, rank=(2, 4), spread=(1, 300), offset=(-2000, 2000))
        shape = sizes(generator, **{f"d{i}": (2, 6) for i in range(n["rank"])}).values()
        logits = randn(generator, *shape, dtype=dtype) * n["spread"] + n["offset"]
        for dim in (-1, int(torch.randint(-n["rank"], n["rank"], (), generator=generator))):
            drop = torch.rand(logits.shape, generator=generator).to(logits.device) < 0.3
            x = logits.masked_fill(drop, float("-inf"))
            x.movedim(dim, -1)[(0,) * (x.dim() - 1)] = float("-inf")  # one slice sees nothing
            with forbid(torch_functions=SOFTMAX_FUNCTIONS + ATTENTION_FUNCTIONS,
                        helpers=["helpers.attention.softmax", *ATTENTION_HELPERS]):
                weights = student(x, dim=dim)
            what = f"stable_softmax, shape {tuple(x.shape)}, dim {dim}, {dtype}, seed {seed}"
            _expect_dtype(weights, dtype, what)
            expect_close(weights, reference.softmax(x.double(), dim=dim), what,
                         **TOLERANCES[dtype])
            if bool((weights.movedim(dim, -1)[(0,) * (x.dim() - 1)] != 0).any()):
                raise HiddenTestFailed(f"{what}: a slice that is all -inf must give zeros")


def _mask(generator: torch.Generator, n: dict[str, int], device: torch.device) -> torch.Tensor:
    """A random boolean mask in one of the shapes that broadcast to (B, H, L, S), with one
    query row that sees no key and one that sees at least two (needs L, S >= 2)."""
    shapes = [(n["L"], n["S"]), (n["B"], 1, n["L"], n["S"]), (n["B"], n["H"], n["L"], n["S"])]
    shape = shapes[int(torch.randint(len(shapes), (), generator=generator))]
    mask = torch.rand(shape, generator=generator) < 0.7
    mask[..., 0, :] = False
    mask[..., 1, :2] = True  # rows with fewer than two keys are one-hot whatever the scale
    return mask.to(device)


def attention(student: Callable) -> None:
    """out and weights vs the reference: no mask, a broadcast bool mask, a given scale."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    for dtype in DTYPES:
        # S, D >= 2: with one key, or d_k = 1, a missing 1/sqrt(d_k) would go unnoticed;
        # L >= 2: the mask's first query is blind, a second one shows whether `scale` is used
        n = sizes(generator, B=(1, 3), H=(1, 4), L=(2, 9), S=(2, 11), D=(2, 40), Dv=(1, 12))
        q = randn(generator, n["B"], n["H"], n["L"], n["D"], dtype=dtype)
        k = randn(generator, n["B"], n["H"], n["S"], n["D"], dtype=dtype)
        v = randn(generator, n["B"], n["H"], n["S"], n["Dv"], dtype=dtype)
        scale = 0.05 + float(torch.rand((), generator=generator))
        for options in ({}, {"mask": _mask(generator, n, q.device), "scale": scale}):
            with forbid(torch_functions=ATTENTION_FUNCTIONS, helpers=ATTENTION_HELPERS):
                result = student(q, k, v, **options)
            what = f"attention, {n}, {sorted(options)}, {dtype}, seed {seed}"
            if not (isinstance(result, tuple) and len(result) == 2):
                raise HiddenTestFailed(f"{what}: expected a tuple (out, weights)")
            expected = reference.scaled_dot_product_attention(
                q.double(), k.double(), v.double(), **options)
            for name, value, target in zip(("out", "weights"), result, expected):
                _expect_dtype(value, dtype, f"{what}: {name}")
                expect_close(value, target, f"{what}: {name}", **TOLERANCES[dtype])


def attention_entropy(student: Callable) -> None:
    """Entropy per query of random, one-hot and all-zero weight rows."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    for dtype in DTYPES:
        # S >= 2 and a uniform query (entropy ln S >= ln 2): with one key, or only sharp rows,
        # every entropy is ~0 and bits, nats or a flipped sign all look right
        n = sizes(generator, B=(1, 3), H=(1, 4), L=(4, 9), S=(2, 11), sharpness=(1, 20))
        logits = randn(generator, n["B"], n["H"], n["L"], n["S"], dtype=dtype)
        weights = reference.softmax(logits * n["sharpness"], dim=-1)  # (B, H, L, S)
        weights[..., 0, :] = 0.0  # a query that attends to nothing
        weights[..., 1, :] = 0.0
        weights[..., 1, -1] = 1.0  # a one-hot query
        weights[..., 2, :] = 1.0 / n["S"]  # a uniform query
        with forbid(torch_functions=ENTROPY_FUNCTIONS):
            entropy = student(weights)
        what = f"attention_entropy, {n}, {dtype}, seed {seed}"
        _expect_dtype(entropy, dtype, what)
        p = weights.double()
        expected = -(p * torch.where(p > 0, p, torch.ones_like(p)).log()).sum(-1)  # (B, H, L)
        expect_close(entropy, expected, what, **TOLERANCES[dtype])
