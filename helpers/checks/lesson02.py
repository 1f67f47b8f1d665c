"""Visible checks for lesson 02 (queries, keys and values).

Each check runs the student's function on small fixed inputs, compares it with PyTorch's
own implementation (``torch.softmax``, ``F.scaled_dot_product_attention``,
``torch.special.entr``) and, when it fails, names the likely mistake.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from helpers.checks import (CheckFailed, call, exercise, expect, expect_close, expect_shape,
                            expect_tensor, guarded, is_close, passed, randn)
from helpers.hidden.lesson02 import (ATTENTION_FUNCTIONS, ATTENTION_HELPERS, ENTROPY_FUNCTIONS,
                                     SOFTMAX_FUNCTIONS)

B, H, L, S, D, DV = 2, 3, 4, 5, 8, 6


def _expect_dtype(value: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    expect(value.dtype == dtype, f"{name} has dtype {value.dtype}, expected {dtype} (the dtype "
           "of the input): did you convert with .float() or create a tensor without dtype=?")


def _expect_finite(value: torch.Tensor, message: str) -> None:
    expect(bool(torch.isfinite(value).all()), message)


@exercise
def dot_scores(fn: Callable) -> None:
    """Check ``dot_scores(q, k)`` -> (B, H, L, S) raw scores q_i · k_j."""
    fn = guarded(fn, "dot_scores", torch_functions=ATTENTION_FUNCTIONS, helpers=ATTENTION_HELPERS)
    q, k = randn(B, H, L, D, seed=0), randn(B, H, S, D, seed=1)
    hint = (f"q is (B, H, L, D) = {(B, H, L, D)} and k is (B, H, S, D) = {(B, H, S, D)}: "
            "transpose only the last two dims of k, k.transpose(-2, -1) (k.T reverses all four)")
    scores = expect_tensor(call(fn, q, k, name="dot_scores(q, k)", hint=hint), "dot_scores(q, k)")
    expect_shape(scores, (B, H, L, S), "dot_scores(q, k)",
                 "q (B, H, L, D) times k transposed on its last two dims, k.transpose(-2, -1)")
    expected = torch.einsum("bhld,bhsd->bhls", q, k)  # (B, H, L, S)
    expect(not is_close(scores, expected / math.sqrt(D)),
           "the scores are divided by √d_k: dot_scores returns the raw dot products; "
           "the scaling belongs to attention (exercise 3)")
    expect_close(scores, expected, "dot_scores(q, k)", "scores[..., i, j] should be q_i · k_j")
    _expect_dtype(scores, q.dtype, "dot_scores(q, k)")
    try:
        fn(q, randn(B, H, S, D + 1, seed=2))
    except ValueError as error:
        expect(str(D) in str(error) and str(D + 1) in str(error), "the ValueError should name "
               f"both shapes, (..., {D}) and (..., {D + 1}); it says: {error}")
    except Exception as error:
        raise CheckFailed(f"q with D={D} and k with D={D + 1} raised {type(error).__name__}, "
                          "not ValueError: compare q.shape[-1] with k.shape[-1] before the "
                          "product and raise ValueError naming both shapes") from error
    else:
        raise CheckFailed(f"q with D={D} and k with D={D + 1} should raise a ValueError naming "
                          "both shapes")
    passed("dot_scores")


@exercise
def stable_softmax(fn: Callable) -> None:
    """Check ``stable_softmax(x, dim=-1)``: sums to 1, matches torch, survives large and -inf."""
    fn = guarded(fn, "stable_softmax", torch_functions=SOFTMAX_FUNCTIONS + ATTENTION_FUNCTIONS,
                 helpers=["helpers.attention.softmax", *ATTENTION_HELPERS])
    x = randn(B, H, L, S, seed=3)
    weights = expect_tensor(call(fn, x, name="stable_softmax(x)",
                                 hint=f"x is {tuple(x.shape)}: take the max and the sum with "
                                      "keepdim=True, so that they broadcast against x"),
                                      "stable_softmax(x)")
    expect_shape(weights, x.shape, "stable_softmax(x)", "softmax keeps the shape of its input")
    expect(is_close(weights.sum(dim=-1), torch.ones(B, H, L, dtype=x.dtype)),
           "weights do not sum to 1 over the keys (the last dim): softmax over the wrong axis?")
    expect_close(weights, torch.softmax(x, dim=-1), "stable_softmax(x)",
                 "compute exp(x - max) / sum(exp(x - max)) along dim")
    _expect_dtype(weights, x.dtype, "stable_softmax(x)")
    expect_close(fn(x, dim=1), torch.softmax(x, dim=1), "stable_softmax(x, dim=1)",
                 "the dim argument is ignored: take the max and the sum along dim")

    large = randn(4, 7, seed=4, dtype=torch.float32) * 30 + 1000  # float32 exp overflows
    _expect_finite(fn(large), "NaN or inf for a row with large logits: subtract the row max "
                   "before exp")
    expect_close(fn(large), torch.softmax(large, dim=-1), "stable_softmax(large logits)",
                 "subtract the row max (keepdim=True) before exp")
    _expect_finite(fn(-large), "NaN or inf for a row of very negative logits (every exp "
                   "underflows to 0): subtract the row max before exp")

    partly = x.masked_fill(randn(B, H, L, S, seed=5) > 0.5, float("-inf"))
    partly[..., 0] = 0.0  # every row keeps at least one key
    expect_close(fn(partly), torch.softmax(partly, dim=-1), "stable_softmax(x with -inf)",
                 "a -inf logit should get weight exactly 0")

    masked = x.clone()
    masked[0, 0, 1] = float("-inf")  # one query that may attend to no key
    result = fn(masked)
    _expect_finite(result, "a row that is all -inf (nothing to attend to) gave NaN: where the "
                   "row max is -inf subtract 0 instead, and do not divide by a zero sum")
    expect(bool((result[0, 0, 1] == 0).all()), "a row that is all -inf should give all-zero "
           "weights (the query reads nothing)")
    passed("stable_softmax")


@exercise
def attention(fn: Callable) -> None:
    """Check ``attention(q, k, v, mask=None, scale=None)`` against PyTorch's SDPA."""
    fn = guarded(fn, "attention", torch_functions=ATTENTION_FUNCTIONS, helpers=ATTENTION_HELPERS)
    q, k, v = randn(B, H, L, D, seed=6), randn(B, H, S, D, seed=7), randn(B, H, S, DV, seed=8)
    hint = (f"q is (B, H, L, D) = {(B, H, L, D)}, k is (B, H, S, D) = {(B, H, S, D)}, v is "
            f"(B, H, S, Dv) = {(B, H, S, DV)}: scores = q @ k.transpose(-2, -1) is (B, H, L, S), "
            "out = weights @ v is (B, H, L, Dv)")
    result = call(fn, q, k, v, name="attention(q, k, v)", hint=hint)
    expect(isinstance(result, tuple) and len(result) == 2,
           f"attention should return a tuple (out, weights), got {type(result).__name__}: "
           "end with `return out, weights`")
    out, weights = expect_tensor(result[0], "out"), expect_tensor(result[1], "weights")
    expect(not (tuple(out.shape) == (B, H, L, S) and tuple(weights.shape) == (B, H, L, DV)),
           "the tuple is (weights, out): return out first, `return out, weights`")
    expect_shape(weights, (B, H, L, S), "weights", "one weight per query and key, (B, H, L, S)")
    expect_shape(out, (B, H, L, DV), "out", "weights (B, H, L, S) @ v (B, H, S, Dv)")
    expect(is_close(weights.sum(dim=-1), torch.ones(B, H, L, dtype=q.dtype)),
           "weights do not sum to 1 over the keys: softmax over the wrong axis?")
    expect(not is_close(out, F.scaled_dot_product_attention(q, k, v, scale=1.0)),
           "output equals unscaled attention: did you divide by √d_k?")
    expect(not is_close(out, F.scaled_dot_product_attention(q, k, v, scale=math.sqrt(D))),
           "output equals attention scaled by √d_k: divide the scores by √d_k, do not multiply")
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)  # (B, H, L, S)
    expect_close(weights, torch.softmax(scores, dim=-1), "weights",
                 "weights = softmax(q kᵀ / √d_k) over the keys")
    expect_close(out, F.scaled_dot_product_attention(q, k, v), "out", "out = weights @ v")
    _expect_dtype(out, q.dtype, "out")
    _expect_dtype(weights, q.dtype, "weights")

    out, _ = fn(q, k, v, scale=0.3)
    expect_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3), "out with scale=0.3",
                 "a given scale replaces 1/√d_k")

    mask = randn(L, S, seed=9) > 0  # (L, S), broadcasts over batch and heads
    mask[:, 0], mask[:, 1] = True, False  # every query sees some keys and misses some
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out, weights = fn(q, k, v, mask=mask)
    expect(not is_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=~mask)),
           "output equals attention with the mask inverted: True means *attend*")
    expect(bool((weights.masked_select(~mask.expand_as(weights)) == 0).all()),
           "masked keys (mask False) should get weight exactly 0: fill their scores with -inf")
    expect_close(out, expected, "out with a (L, S) mask",
                 "mask the scores (masked_fill with -inf where mask is False) before the softmax")

    padding = torch.arange(S, device=q.device) < torch.tensor([S, 2], device=q.device)[:, None]
    padding = padding[:, None, None, :]  # (B, 1, 1, S): sequence 1 has only 2 real keys
    expect_close(fn(q, k, v, mask=padding)[0],
                 F.scaled_dot_product_attention(q, k, v, attn_mask=padding),
                 "out with a (B, 1, 1, S) mask", "the mask must broadcast against (B, H, L, S)")

    blind = mask.clone()
    blind[2] = False  # query 2 may attend to nothing
    out, weights = fn(q, k, v, mask=blind)
    _expect_finite(out, "a query whose mask allows no key gave NaN: its weights should be "
                   "zeros (reference.softmax handles all -inf rows)")
    expect(bool((out[..., 2, :] == 0).all()) and bool((weights[..., 2, :] == 0).all()),
           "a query whose mask allows no key should get zero weights and a zero output")
    passed("attention")


@exercise
def attention_entropy(fn: Callable) -> None:
    """Check ``attention_entropy(weights)`` -> (..., L) entropy in nats, 0 ln 0 = 0."""
    fn = guarded(fn, "attention_entropy", torch_functions=ENTROPY_FUNCTIONS)
    weights = torch.softmax(randn(B, H, L, S, seed=10) * 2, dim=-1)
    entropy = expect_tensor(fn(weights), "attention_entropy(weights)")
    expect_shape(entropy, (B, H, L), "attention_entropy(weights)",
                 "one entropy per query: sum over the keys (the last dim)")
    expected = torch.special.entr(weights).sum(dim=-1)  # (B, H, L)
    expect(not is_close(entropy, -expected), "entropy is negative: H = -Σ p ln p (mind the sign)")
    expect(not is_close(entropy, expected / math.log(2)),
           "entropy is in bits: use the natural log (nats), torch.log")
    expect_close(entropy, expected, "attention_entropy(weights)",
                 "H = -Σ_j p_j ln p_j over the keys")
    _expect_dtype(entropy, weights.dtype, "attention_entropy(weights)")

    uniform = torch.full((3, S), 1.0 / S, dtype=torch.float64, device=weights.device)
    expect_close(fn(uniform), torch.full((3,), math.log(S), dtype=torch.float64),
                 "entropy of uniform weights", f"uniform attention over {S} keys has H = ln {S}")

    edge = torch.zeros(2, S, dtype=torch.float64, device=weights.device)
    edge[0, 3] = 1.0  # row 0 one-hot, row 1 all zero (a query that attends to nothing)
    result = fn(edge)
    _expect_finite(result, "NaN for a one-hot or all-zero row: 0 · ln 0 must count as 0 "
                   "(ln 0 = -inf and 0 · -inf = NaN); replace ln p by 0 where p == 0")
    expect_close(result, torch.zeros(2, dtype=torch.float64), "entropy of one-hot / zero rows",
                 "a one-hot row and an all-zero row both have entropy 0")
    passed("attention_entropy")
