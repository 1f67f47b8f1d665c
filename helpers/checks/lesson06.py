"""Visible checks for lesson 06 (FlashAttention).

Each check runs the student's function on small fixed inputs, compares it with PyTorch's
``F.scaled_dot_product_attention`` and autograd (and ``helpers.flash`` for the counts), and
names the likely mistake. Two watchers, shared with the hidden tests, check how the answer
computes and not only what: :class:`TileWatch` fails an answer that builds a tensor as large
as the (L, S) matrix of scores, :func:`matmul_flops` counts the multiply-adds of the tiles it
computes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from helpers import flash as reference
from helpers.checks import (CheckFailed, call, exercise, expect, expect_close, expect_shape,
                            expect_tensor, is_close, passed, randn)

B, H, L, S, D, DV = 2, 3, 37, 29, 8, 5  # L != S; both ragged for the blocks below
BLOCK_Q, BLOCK_K = 8, 16


# --- watchers, also used by the hidden tests -----------------------------------------------

class TileWatch(TorchFunctionMode):
    """Remembers the first tensor created inside it that is as large as the (L, S) scores.

    A tensor counts when its last two dims are (L, S) or (S, L), or when it has as many
    elements as all the heads' (L, S) matrices together, ``lead · L · S``. Use inputs with
    L, S > max(D, Dv) and blocks smaller than L and S, so that q, k, v, the output and one
    tile are all smaller.
    """

    def __init__(self, L: int, S: int, lead: int):
        super().__init__()
        self.L, self.S, self.full = L, S, lead * L * S
        self.offender: tuple[int, ...] | None = None

    def _too_big(self, tensor: torch.Tensor) -> bool:
        return tensor.dim() >= 2 and (tuple(tensor.shape[-2:]) in ((self.L, self.S),
                                                                   (self.S, self.L))
                                      or tensor.numel() >= self.full)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if self.offender is None:  # a tensor, or a tuple of them (max, split, ...)
            for value in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(value, torch.Tensor) and self._too_big(value):
                    self.offender = tuple(value.shape)
        return result

    def message(self, what: str) -> str | None:
        """Why the answer fails, or None: the tensor it should not have built."""
        if self.offender is None:
            return None
        return (f"{what} built a tensor of shape {self.offender}, as large as the (L, S) = "
                f"({self.L}, {self.S}) matrix of scores: compute one (block_q, block_k) tile "
                "at a time and never keep more than that tile")


def _einsum_flops(equation: str, operands: list[torch.Tensor], result: torch.Tensor) -> int:
    """2 · (output elements) · (size of the summed-over indices) of one einsum."""
    inputs, _, output = equation.replace(" ", "").partition("->")
    specs = inputs.split(",")
    if not _:  # implicit output: the letters that appear once
        letters = "".join(specs).replace(".", "")
        output = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    sizes: dict[str, int] = {}
    for spec, operand in zip(specs, operands):
        named = spec.replace("...", "")
        shape = operand.shape[len(operand.shape) - len(named):] if "..." in spec else operand.shape
        sizes.update(zip(named, shape))
    summed = math.prod(size for letter, size in sizes.items() if letter not in output)
    return 2 * result.numel() * summed


class MatmulFlops(TorchFunctionMode):
    """Counts the FLOPs (2 per multiply-add) of the matrix products run inside it:
    ``@``, ``matmul``, ``bmm``, ``mm``, ``baddbmm``, ``addmm``, ``einsum``."""

    LEFT = {"matmul": 0, "__matmul__": 0, "bmm": 0, "mm": 0, "__rmatmul__": 1, "baddbmm": 1,
            "baddbmm_": 1, "addmm": 1, "addmm_": 1}  # which argument is the left factor

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if isinstance(result, torch.Tensor) and name == "einsum":
            operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) \
                else list(args[1:])
            self.flops += _einsum_flops(args[0], operands, result)
        elif isinstance(result, torch.Tensor) and name in self.LEFT:
            self.flops += 2 * result.numel() * args[self.LEFT[name]].shape[-1]
        return result


def matmul_flops(fn: Callable[[], object]) -> tuple[object, int]:
    """``fn()`` and the FLOPs of the matrix products it ran (:class:`MatmulFlops`)."""
    counter = MatmulFlops()
    with counter:
        result = fn()
    return result, counter.flops


def tile_flops(L: int, S: int, D: int, Dv: int, block_q: int, block_k: int, lead: int,
               causal: bool) -> int:
    """FLOPs of the two products (q kᵀ and p v) of every tile a forward computes."""
    total = 0
    for q_start in range(0, L, block_q):
        q_end = min(q_start + block_q, L)
        n_keys = reference.visible_keys(q_end, L, S, causal)
        for k_start in range(0, n_keys, block_k):
            k_end = min(k_start + block_k, S)
            total += 2 * (q_end - q_start) * (k_end - k_start) * (D + Dv)
    return lead * total


class AutogradWatch(TorchFunctionMode):
    """Notes whether ``torch.autograd.grad`` or ``Tensor.backward`` ran inside it."""

    def __init__(self):
        super().__init__()
        self.used = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("grad", "backward"):
            self.used = True
        return func(*args, **(kwargs or {}))


# --- inputs and oracles ---------------------------------------------------------------------

def _qkv(L_: int = L, S_: int = S, seed: int = 0, dtype: torch.dtype = torch.float64
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (randn(B, H, L_, D, seed=seed, dtype=dtype), randn(B, H, S_, D, seed=seed + 1, dtype=dtype),
            randn(B, H, S_, DV, seed=seed + 2, dtype=dtype))


def _bottom_right(L_: int, S_: int, device: torch.device) -> torch.Tensor:
    """The bottom-right causal mask by its definition, (L, S) bool: query i sees key j when
    j <= S - L + i."""
    rows = torch.arange(L_, device=device)[:, None]
    cols = torch.arange(S_, device=device)[None, :]
    return cols <= S_ - L_ + rows


def oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
           mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """out from PyTorch's SDPA (zeros for a query that sees no key) and the logsumexp of the
    scaled, masked scores (-inf for such a query)."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).nan_to_num(0.0)
    scores = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return out, torch.logsumexp(scores, dim=-1)


def _expect_dtype(value: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    expect(value.dtype == dtype, f"{name} has dtype {value.dtype}, expected {dtype} (the dtype "
           "of q): did you create a tensor without dtype=, or convert with .float()?")


def _expect_pair(result: object, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    expect(isinstance(result, tuple) and len(result) == 2,
           f"{what} should return a tuple (out, lse), got {type(result).__name__}")
    return expect_tensor(result[0], "out"), expect_tensor(result[1], "lse")


# --- exercise 1: the IO model ---------------------------------------------------------------

@exercise
def hbm_accesses(fn: Callable) -> None:
    """Check ``hbm_accesses(L, S, D, Dv, block_q) -> (standard, tiled)``."""
    args = (100, 60, 16, 8, 32)  # 100 / 32: a ragged last block; D != Dv
    result = call(fn, *args, name=f"hbm_accesses{args}")
    expect(isinstance(result, tuple) and len(result) == 2,
           f"hbm_accesses should return a pair (standard, tiled), got {type(result).__name__}")
    expect(all(isinstance(x, int) and not isinstance(x, bool) for x in result),
           f"hbm_accesses should return Python integers (element counts), got "
           f"{[type(x).__name__ for x in result]}: use math.ceil, not torch")
    standard, tiled = result
    expected = reference.hbm_accesses(*args)
    L_, S_, D_, Dv, block_q = args
    expect((standard, tiled) != (expected.flash, expected.standard),
           "the pair is swapped: return (standard, tiled)")
    base = L_ * D_ + S_ * D_ + S_ * Dv + L_ * Dv
    for times in (1, 2, 3):
        expect(standard != base + times * L_ * S_, f"standard attention moves the L x S matrix "
               f"four times (write S, read S, write P, read P), not {times}")
    expect(standard == expected.standard, f"standard should be L·D + S·D + 4·L·S + S·Dv + "
           f"L·Dv = {expected.standard} for {args}, got {standard}")
    once = L_ * D_ + S_ * (D_ + Dv) + L_ * Dv + L_
    expect(tiled != once, "K and V are read once per query block: ⌈L / block_q⌉ · S · (D + Dv)")
    floor = L_ * D_ + (L_ // block_q) * S_ * (D_ + Dv) + L_ * Dv + L_
    expect(tiled != floor, "the last, ragged query block reads K and V too: ⌈L / block_q⌉ "
           "blocks (math.ceil), not L // block_q")
    expect(tiled != expected.flash - L_, "the tiled forward also writes the logsumexp, one "
           "number per query: + L")
    expect(tiled == expected.flash, f"tiled should be L·D + ⌈L / block_q⌉·S·(D + Dv) + L·Dv + "
           f"L = {expected.flash} for {args}, got {tiled}")
    for other in ((64, 64, 64, 64, 64), (10, 300, 32, 16, 128)):  # exact and oversized blocks
        expect(tuple(fn(*other)) == tuple(reference.hbm_accesses(*other)),
               f"hbm_accesses{other} should be {tuple(reference.hbm_accesses(*other))}, got "
               f"{tuple(fn(*other))}")
    passed("hbm_accesses")


# --- exercise 2: merging online-softmax states ---------------------------------------------

def softmax_state(scores: torch.Tensor, values: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m, l, acc) of scores (..., L, n) over values (..., n, Dv); empty rows if all -inf: the
    state the online softmax carries (Milakov & Gimelshein, 2018), computed in one go."""
    m = scores.amax(dim=-1)
    shift = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    p = (scores - shift[..., None]).exp()
    return m, p.sum(dim=-1), p @ values


@exercise
def merge_softmax_states(fn: Callable) -> None:
    """Check ``merge_softmax_states(m_a, l_a, acc_a, m_b, l_b, acc_b) -> (m, l, acc)``."""
    s_a, s_b = randn(B, 5, 7, seed=10) * 3, randn(B, 5, 4, seed=11) * 3 + 2  # (B, L, n)
    v_a, v_b = randn(B, 7, 3, seed=12), randn(B, 4, 3, seed=13)  # (B, n, Dv)
    a, b = softmax_state(s_a, v_a), softmax_state(s_b, v_b)
    copies = [t.clone() for t in (*a, *b)]
    hint = ("m and l are (..., L) = (2, 5), acc is (..., L, Dv) = (2, 5, 3): scale the "
            "accumulators by the (..., L, 1) factor, e.g. scale[..., None]")
    result = call(fn, *a, *b, name="merge_softmax_states(state_a, state_b)", hint=hint)
    expect(isinstance(result, tuple) and len(result) == 3,
           f"merge_softmax_states should return a tuple (m, l, acc), got {type(result).__name__}")
    m, l, acc = (expect_tensor(x, name) for x, name in zip(result, ("m", "l", "acc")))
    expect(all(torch.equal(x, y) for x, y in zip((*a, *b), copies)),
           "merge_softmax_states changed its inputs in place: return new tensors")
    expect_shape(m, (B, 5), "m", "one running max per query")
    expect_shape(l, (B, 5), "l", "one running sum per query")
    expect_shape(acc, (B, 5, 3), "acc", "one accumulator (Dv values) per query")
    all_scores, all_values = torch.cat([s_a, s_b], -1), torch.cat([v_a, v_b], -2)
    m_true, l_true, acc_true = softmax_state(all_scores, all_values)
    expect_close(m, m_true, "m", "the merged m is the larger of the two maxima, "
                 "torch.maximum(m_a, m_b)")
    expect(not is_close(l, a[1] + b[1]), "l is the plain sum l_a + l_b: each side must be "
           "rescaled to the new max first, l = e^(m_a - m)·l_a + e^(m_b - m)·l_b")
    expect_close(l, l_true, "l", "l = e^(m_a - m)·l_a + e^(m_b - m)·l_b (rescale by "
                 "e^(m_side - m), which is <= 1)")
    expect(not is_close(acc, a[2] + b[2]), "acc is the plain sum acc_a + acc_b: you rescaled "
           "the sum but not the accumulator (the output); it needs the same factors e^(m_a - m) "
           "and e^(m_b - m)")
    expect_close(acc, acc_true, "acc", "acc = e^(m_a - m)·acc_a + e^(m_b - m)·acc_b, the same "
                 "factors as l, broadcast over Dv")
    expect_close(acc / l[..., None], torch.softmax(all_scores, -1) @ all_values,
                 "acc / l", "the merged state should give softmax attention over all keys")

    empty = (torch.full_like(a[0], -math.inf), torch.zeros_like(a[1]), torch.zeros_like(a[2]))
    m, l, acc = fn(*empty, *b)
    expect(bool(torch.isfinite(l).all() & torch.isfinite(acc).all()),
           "merging an empty state (m = -inf, l = 0, acc = 0) gave NaN or inf")
    expect_close(acc, b[2], "acc after merging an empty state", "an empty state is neutral: "
                 "e^(-inf - m) = 0")
    m, l, acc = fn(*empty, *empty)
    expect(not bool(torch.isnan(l).any() | torch.isnan(acc).any()),
           "merging two empty states gave NaN: -inf - (-inf) is NaN; where the merged m is "
           "-inf, subtract 0 instead")
    expect(bool(torch.isneginf(m).all() & (l == 0).all() & (acc == 0).all()),
           "two empty states merge into an empty state: m = -inf, l = 0, acc = 0")
    half = tuple(x.clone() for x in a)  # some queries empty on one side only
    half[0][:, :2], half[1][:, :2], half[2][:, :2] = -math.inf, 0.0, 0.0
    m, l, acc = fn(*half, *b)
    expect_close(acc[:, :2], b[2][:, :2], "acc of queries empty on side a",
                 "rows where one side is empty keep the other side's state")
    m32, l32, acc32 = fn(*(x.float() for x in (*a, *b)))
    _expect_dtype(acc32, torch.float32, "acc")
    passed("merge_softmax_states")


# --- exercise 3: the tiled forward ----------------------------------------------------------

def _diagnose_forward(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, block_q: int, block_k: int, scale: float | None,
                      mask: torch.Tensor | None, what: str) -> None:
    """Compare (out, lse) with the oracle and name the likely mistake."""
    out_true, lse_true = oracle(q, k, v, scale, mask)
    L_, S_ = q.shape[-2], k.shape[-2]
    full_rows = L_ // block_q * block_q
    if L_ % block_q and is_close(out[..., :full_rows, :], out_true[..., :full_rows, :]):
        expect_close(out[..., full_rows:, :], out_true[..., full_rows:, :], f"{what}: out of the "
                     f"last {L_ - full_rows} queries", "the last query block is ragged "
                     f"({L_} = {L_ // block_q} x {block_q} + {L_ % block_q}): loop over "
                     "range(0, L, block_q) and slice q[..., start:start + block_q, :], which "
                     "stops at L by itself")
    full_keys = S_ // block_k * block_k
    if S_ % block_k and mask is None and full_keys:
        dropped = oracle(q, k[..., :full_keys, :], v[..., :full_keys, :], scale)[0]
        expect(not is_close(out, dropped), f"{what}: the keys after the last full block are "
               f"missing: the last key block is ragged ({S_} = {S_ // block_k} x {block_k} + "
               f"{S_ % block_k}); loop over range(0, S, block_k)")
    if scale is None:
        expect(not is_close(out, oracle(q, k, v, 1.0, mask)[0]),
               f"{what}: the output is unscaled attention: multiply the scores by scale, "
               "1/√D by default")
    if not is_close(out, out_true):
        if is_close(lse, lse_true):
            raise CheckFailed(f"{what}: the logsumexp is right but the output is not: rescale "
                              "acc by exp(m_old - m_new) whenever the max changes, as you "
                              "rescale l (rescaled the sum but not the output?), and divide "
                              "by l once at the end")
        expect_close(out, out_true, f"{what}: out", "when a tile raises the running max, "
                     "rescale both l and acc by exp(m_old - m_new) before adding the tile")
    finite = torch.isfinite(lse_true)  # False for queries that see no key
    scores = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    m_true = scores.amax(dim=-1)
    expect(not is_close(lse.masked_fill(~finite, 0), m_true.masked_fill(~finite, 0)),
           f"{what}: lse is the running max m alone: the logsumexp is m + log(l)")
    expect_close(lse.masked_fill(~finite, 0), lse_true.masked_fill(~finite, 0), f"{what}: lse",
                 "lse = m + log(l), the log of the row's full softmax denominator")


def _check_tiles(fn: Callable, args: tuple, kwargs: dict, L_: int, S_: int, name: str,
                 hint: str) -> object:
    """Run the answer under :class:`TileWatch` and fail if it built an (L, S) tensor."""
    watch = TileWatch(L_, S_, B * H)
    with watch:
        result = call(fn, *args, name=name, hint=hint, **kwargs)
    message = watch.message(name)
    if message:
        raise CheckFailed(message)
    return result


@exercise
def tiled_attention(fn: Callable) -> None:
    """Check ``tiled_attention(q, k, v, block_q, block_k, scale) -> (out, lse)`` against SDPA."""
    q, k, v = _qkv()
    hint = (f"q is (B, H, L, D) = {tuple(q.shape)}, k (B, H, S, D) = {tuple(k.shape)}, v (B, "
            f"H, S, Dv) = {tuple(v.shape)}: a tile of scores is q_i @ k_j.transpose(-2, -1), "
            "(..., block_q, block_k); m and l are (..., block_q), acc (..., block_q, Dv)")
    name = f"tiled_attention(q, k, v, block_q={BLOCK_Q}, block_k={BLOCK_K})"
    result = _check_tiles(fn, (q, k, v), {"block_q": BLOCK_Q, "block_k": BLOCK_K}, L, S,
                          name, hint)
    out, lse = _expect_pair(result, "tiled_attention")
    expect_shape(out, (B, H, L, DV), "out", "one output row (Dv values) per query")
    expect_shape(lse, (B, H, L), "lse", "one logsumexp per query: drop the last dim")
    _diagnose_forward(out, lse, q, k, v, BLOCK_Q, BLOCK_K, None, None, name)
    _expect_dtype(out, q.dtype, "out")
    _expect_dtype(lse, q.dtype, "lse")

    out, lse = _expect_pair(fn(q, k, v, block_q=16, block_k=8, scale=0.3), "tiled_attention")
    _diagnose_forward(out, lse, q, k, v, 16, 8, 0.3, None, "with scale=0.3")
    for block_q, block_k in ((64, 64), (1, 29), (37, 1)):  # larger than, or all of, a sequence
        out, lse = _expect_pair(fn(q, k, v, block_q=block_q, block_k=block_k), "tiled_attention")
        _diagnose_forward(out, lse, q, k, v, block_q, block_k, None, None,
                          f"block_q={block_q}, block_k={block_k}")
    out, lse = _expect_pair(fn(q, k, v), "tiled_attention")
    _diagnose_forward(out, lse, q, k, v, 64, 64, None, None, "with the default blocks")

    layout = randn(B, L, H, D, seed=20).transpose(1, 2)  # (B, H, L, D), not contiguous
    out, lse = fn(layout, k, v, block_q=BLOCK_Q, block_k=BLOCK_K)
    _diagnose_forward(out, lse, layout, k, v, BLOCK_Q, BLOCK_K, None, None,
                      "with a non-contiguous q (a transposed (B, L, H, D) tensor)")
    q3, k3, v3 = q[0], k[0], v[0]  # (H, L, D): other leading dims
    out, lse = fn(q3, k3, v3, block_q=BLOCK_Q, block_k=BLOCK_K)
    expect_shape(out, (H, L, DV), "out for (H, L, D) inputs", "any leading dims (...)")
    _diagnose_forward(out, lse, q3, k3, v3, BLOCK_Q, BLOCK_K, None, None, "for (H, L, D) inputs")
    q32, k32, v32 = (t.float() for t in (q, k, v))
    out, lse = fn(q32, k32, v32, block_q=BLOCK_Q, block_k=BLOCK_K)
    _expect_dtype(out, torch.float32, "out for float32 inputs")
    _expect_dtype(lse, torch.float32, "lse for float32 inputs")
    _diagnose_forward(out.double(), lse.double(), q, k, v, BLOCK_Q, BLOCK_K, None, None,
                      "in float32")
    passed("tiled_attention")


# --- exercise 4: causal, skipping the tiles above the diagonal ------------------------------

@exercise
def causal_tiled_attention(fn: Callable) -> None:
    """Check ``causal_tiled_attention(q, k, v, block_q, block_k, scale) -> (out, lse,
    n_skipped)`` against SDPA with PyTorch's bottom-right causal mask."""
    for L_, S_, block_q, block_k in ((21, 37, 8, 8), (37, 21, 8, 8), (37, 37, 16, 8)):
        q, k, v = _qkv(L_, S_, seed=30)
        name = f"causal_tiled_attention(q, k, v, block_q={block_q}, block_k={block_k})"
        hint = (f"q is {tuple(q.shape)}, k {tuple(k.shape)}: each tile's mask is (block_q, "
                "block_k), built from global positions: rows q_start + arange, columns "
                "k_start + arange")
        watch = TileWatch(L_, S_, B * H)
        with watch:
            result, flops = matmul_flops(lambda: call(fn, q, k, v, block_q=block_q,
                                                      block_k=block_k, name=name, hint=hint))
        message = watch.message(name)
        if message:
            raise CheckFailed(message + " (for the mask too: build each tile's own)")
        expect(isinstance(result, tuple) and len(result) == 3,
               f"causal_tiled_attention should return (out, lse, n_skipped), got "
               f"{type(result).__name__}")
        out, lse, n_skipped = expect_tensor(result[0], "out"), expect_tensor(result[1], "lse"), result[2]
        expect_shape(out, (B, H, L_, DV), "out")
        expect_shape(lse, (B, H, L_), "lse")
        mask = _bottom_right(L_, S_, q.device)
        expect(bool(torch.isfinite(out).all()), f"{name}: NaN in the output: a query that sees "
               "no key (L > S: the first L - S) must get zeros; where m is -inf, subtract 0, "
               "and do not divide by l = 0")
        if L_ < S_:
            top_left = torch.ones(L_, S_, dtype=torch.bool, device=q.device).tril()
            expect(not is_close(out, oracle(q, k, v, None, top_left)[0]),
                   f"{name}: the mask is aligned top-left (query i sees keys 0 .. i, like "
                   "is_causal=True): align it bottom-right, query i sees keys 0 .. S - L + i")
        if not is_close(out, oracle(q, k, v, None, mask)[0]):
            raise CheckFailed(f"{name}: out differs from causal attention (bottom-right: query "
                              "i sees keys 0 .. S - L + i): mask each diagonal tile by global "
                              "positions, key j hidden from query i when j > S - L + i")
        _diagnose_forward(out, lse, q, k, v, block_q, block_k, None, mask, name)
        blind = L_ - S_
        if blind > 0:
            expect(bool(torch.isneginf(lse[..., :blind]).all()), f"{name}: the {blind} queries "
                   "that see no key should have lse = -inf (an empty softmax)")
        counts = reference.causal_block_counts(L_, S_, block_q, block_k)
        expect(isinstance(n_skipped, int) or (isinstance(n_skipped, torch.Tensor)
                                               and n_skipped.numel() == 1),
               f"n_skipped should be an integer, got {type(n_skipped).__name__}")
        n_skipped = int(n_skipped)
        tiles_total = math.ceil(L_ / block_q) * math.ceil(S_ / block_k)
        diagonal = sum(1 for i in range(0, L_, block_q) for j in range(0, S_, block_k)
                       if bool(mask[i:i + block_q, j:j + block_k].any())
                       and not bool(mask[i:i + block_q, j:j + block_k].all()))
        expect(n_skipped != counts.skipped + diagonal, f"{name}: n_skipped = {n_skipped} counts "
               "the diagonal tiles too; those are partly visible: compute them with a mask, "
               "and count only the tiles wholly above the diagonal")
        expect(n_skipped == counts.skipped, f"{name}: n_skipped should be {counts.skipped} of "
               f"the {tiles_total} tiles (those whose first key is after the last key the "
               f"block's last query sees, S - L + q_end - 1), got {n_skipped}")
        every = tile_flops(L_, S_, D, DV, block_q, block_k, B * H, causal=False)
        needed = tile_flops(L_, S_, D, DV, block_q, block_k, B * H, causal=True)
        expect(flops < (every + needed) / 2, f"{name}: you multiplied {flops:,} FLOPs of tiles, "
               f"about all {every:,} of them; skipping the tiles above the diagonal needs "
               f"{needed:,}: test the tile before computing its scores, and `continue`")
    q, k, v = _qkv(40, 40, seed=31)
    out, lse, _ = fn(q, k, v, scale=0.3)
    _diagnose_forward(out, lse, q, k, v, 64, 64, 0.3, _bottom_right(40, 40, q.device),
                      "with scale=0.3 and the default blocks")
    out, lse, _ = fn(q.float(), k.float(), v.float(), block_q=8, block_k=8)
    _expect_dtype(out, torch.float32, "out for float32 inputs")
    _expect_dtype(lse, torch.float32, "lse for float32 inputs")
    passed("causal_tiled_attention")


# --- exercise 5: the backward from recomputation --------------------------------------------

def _autograd_oracle(q, k, v, dout, scale=None, mask=None):
    """dq, dk, dv of SDPA by autograd (PyTorch's own backward)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, attn_mask=mask, scale=scale)
    return torch.autograd.grad(out, leaves, dout)


@exercise
def tiled_attention_backward(fn: Callable) -> None:
    """Check ``tiled_attention_backward(q, k, v, out, lse, dout, block_q, block_k, scale)``
    against autograd through SDPA."""
    q, k, v = _qkv(seed=40)
    dout = randn(B, H, L, DV, seed=43)
    out, lse = oracle(q, k, v)
    dq_true, dk_true, dv_true = _autograd_oracle(q, k, v, dout)
    name = f"tiled_attention_backward(..., block_q={BLOCK_Q}, block_k={BLOCK_K})"
    hint = ("a tile of weights is p = exp(q_i k_jᵀ · scale - lse_i[..., None]), (..., block_q, "
            "block_k); dv_j += pᵀ dout_i, ds = p ⊙ (dout_i v_jᵀ - delta_i[..., None])")
    autograd = AutogradWatch()
    with autograd:
        result = _check_tiles(fn, (q, k, v, out, lse, dout),
                              {"block_q": BLOCK_Q, "block_k": BLOCK_K}, L, S, name, hint)
    expect(not autograd.used, f"{name} called torch.autograd (grad or backward): compute the "
           "gradients from the formulas, tile by tile")
    expect(isinstance(result, tuple) and len(result) == 3,
           f"tiled_attention_backward should return (dq, dk, dv), got {type(result).__name__}")
    dq, dk, dv = (expect_tensor(x, n) for x, n in zip(result, ("dq", "dk", "dv")))
    expect_shape(dq, q.shape, "dq", "shaped like q")
    expect_shape(dk, k.shape, "dk", "shaped like k")
    expect_shape(dv, v.shape, "dv", "shaped like v")
    scale = 1 / math.sqrt(D)
    if not is_close(dv, dv_true):
        raise CheckFailed(f"{name}: dv differs from autograd's: dv_j = Σ_i p_ijᵀ dout_i with "
                          "p = exp(s - lse) from the saved lse over all keys (not a softmax "
                          "within the tile), summed over every query block")
    expect(not (is_close(dq * scale, dq_true) or is_close(dq / scale, dq_true)
                or is_close(dk * scale, dk_true) or is_close(dk / scale, dk_true)),
           f"{name}: dq or dk is off by the factor scale = 1/√D: s = q kᵀ · scale, so dq = ds "
           "k · scale and dk = dsᵀ q · scale, once each")
    if not (is_close(dq, dq_true) and is_close(dk, dk_true)):
        raise CheckFailed(f"{name}: dv is right but dq or dk is not: ds = p ⊙ (dp - delta) with "
                          "dp = dout vᵀ and delta = rowsum(dout ⊙ out) over the whole row "
                          "(from the saved out), then dq_i += ds k_j · scale, dk_j += dsᵀ q_i "
                          "· scale")
    _expect_dtype(dq, q.dtype, "dq")
    for block_q, block_k, scale in ((64, 64, None), (16, 8, 0.3)):
        out_s, lse_s = oracle(q, k, v, scale)
        got = fn(q, k, v, out_s, lse_s, dout, block_q=block_q, block_k=block_k, scale=scale)
        for value, true, n in zip(got, _autograd_oracle(q, k, v, dout, scale), ("dq", "dk", "dv")):
            expect_close(value, true, f"{n} with block_q={block_q}, block_k={block_k}, "
                         f"scale={scale}", "a given scale replaces 1/√D; blocks may be larger "
                         "than the sequence")
    strided = randn(B, L, H, DV, seed=44).transpose(1, 2)  # non-contiguous dout
    got = fn(q, k, v, out, lse, strided, block_q=BLOCK_Q, block_k=BLOCK_K)
    for value, true, n in zip(got, _autograd_oracle(q, k, v, strided), ("dq", "dk", "dv")):
        expect_close(value, true, f"{n} with a non-contiguous dout")
    got = fn(*(t.float() for t in (q, k, v, out, lse, dout)), block_q=BLOCK_Q, block_k=BLOCK_K)
    _expect_dtype(got[1], torch.float32, "dk for float32 inputs")
    passed("tiled_attention_backward")


# --- exercise 6: the autograd.Function ------------------------------------------------------

def saved_matrix(grad_fn: object, L_: int, S_: int, lead: int) -> tuple[int, ...] | None:
    """The shape of a tensor as large as the (L, S) weights that a custom Function's context
    keeps (in ``save_for_backward`` or as an attribute), or None."""
    watch = TileWatch(L_, S_, lead)
    kept = list(getattr(grad_fn, "saved_tensors", ()) or ())
    kept += tree_leaves([value for value in vars(grad_fn).values()
                         if isinstance(value, (torch.Tensor, tuple, list, dict))])
    for value in kept:
        if isinstance(value, torch.Tensor) and watch._too_big(value):
            return tuple(value.shape)
    return None


def run_function(cls: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 dout: torch.Tensor, causal: bool | None, name: str
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], object, tuple[int, ...] | None]:
    """out = cls.apply(q, k, v[, causal]), the grads of (out · dout).sum() by backward(), the
    output's grad_fn and the shape of any (L, S)-sized tensor its context kept."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    args = leaves if causal is None else [*leaves, causal]
    hint = ("forward(ctx, q, k, v, causal=False) returns out; backward(ctx, dout) returns one "
            "gradient per input of forward: dq, dk, dv, and None for causal")
    out = expect_tensor(call(cls.apply, *args, name=name, hint=hint), f"{name} (out)")
    grad_fn = out.grad_fn
    saved = None if grad_fn is None else saved_matrix(grad_fn, q.shape[-2], k.shape[-2],
                                                      q.shape[:-2].numel())
    call(lambda: (out * dout).sum().backward(), name=f"loss.backward() after {name}", hint=hint)
    return out, tuple(t.grad for t in leaves), grad_fn, saved


@exercise
def flash_function(cls: object) -> None:
    """Check ``FlashAttention.apply(q, k, v, causal)``: output and gradients against SDPA and
    autograd, and nothing of size L x S saved."""
    expect(isinstance(cls, type) and issubclass(cls, torch.autograd.Function),
           "FlashAttention should be a class that subclasses torch.autograd.Function")
    from helpers.attention import scaled_dot_product_attention as materialised

    for L_, S_, causal in ((70, 90, None), (70, 90, True), (90, 70, True)):
        q, k, v = _qkv(L_, S_, seed=50)
        dout = randn(B, H, L_, DV, seed=53)
        name = f"FlashAttention.apply(q, k, v{'' if causal is None else f', causal={causal}'})"
        watch = TileWatch(L_, S_, B * H)
        with watch:
            out, grads, grad_fn, shape = run_function(cls, q, k, v, dout, causal, name)
        message = watch.message(name)
        if message:
            raise CheckFailed(message + ": use flash.flash_attention_reference and "
                              "flash.flash_attention_backward")
        expect(isinstance(grad_fn, torch.autograd.function.BackwardCFunction),
               f"{name}: the output does not come from your Function's forward (its grad_fn is "
               f"{type(grad_fn).__name__}): return out from forward and call FlashAttention.apply")
        expect(shape is None, f"{name}: the Function saved a tensor of shape {shape}, as large "
               "as the (L, S) weights: save q, k, v, out and the logsumexp only; the backward "
               "recomputes the weights")
        mask = _bottom_right(L_, S_, q.device) if causal else None
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        expected = materialised(*leaves, mask=mask)[0]  # zeros for queries that see nothing
        (expected * dout).sum().backward()
        if causal and not is_close(out, expected):
            raise CheckFailed(f"{name}: out is not causal attention: pass causal to "
                              "flash.flash_attention_reference")
        expect_close(out, expected, f"{name}: out", "forward returns the output of "
                     "flash.flash_attention_reference(q, k, v, causal)")
        for grad, leaf, n in zip(grads, leaves, ("q", "k", "v")):
            expect(grad is not None, f"{name}: {n}.grad is None: backward must return dq, dk, dv")
            if causal and not is_close(grad, leaf.grad):
                raise CheckFailed(f"{name}: the gradient of {n} is not causal attention's: keep "
                                  "causal on ctx (ctx.causal = causal) and pass it to "
                                  "flash.flash_attention_backward")
            expect_close(grad, leaf.grad, f"{name}: gradient of {n}", "backward returns "
                         "flash.flash_attention_backward(q, k, v, out, lse, dout, causal) in "
                         "the order dq, dk, dv")
    passed("FlashAttention")
