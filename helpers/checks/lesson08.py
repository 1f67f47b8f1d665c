"""Visible checks for lesson 08 (ring attention and linear attention).

The ring checks compare with PyTorch's ``F.scaled_dot_product_attention`` and count the
calls to ``helpers.flash.block_attention``; the linear-attention checks compare with
SDPA too, through an identity: softmax attention whose scores are ``log(φ(q)·φ(k))`` is
linear attention, since ``exp(log s) / Σ exp(log s) = s / Σ s``. Each failure names the
likely mistake.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from helpers.checks import (CheckFailed, call, exercise, expect, expect_close, expect_shape,
                            expect_tensor, is_close, passed, randn)
from helpers.hidden._core import record_calls, record_shapes
from helpers.ring import ring_work as reference_ring_work

B, H = 2, 3


def _expect_dtype(value: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    expect(value.dtype == dtype, f"{name} has dtype {value.dtype}, expected {dtype} (the dtype "
           "of the input): did you create a tensor without dtype=, or call .double()?")


def _expect_value_error(fn: Callable, args: tuple, what: str, how: str) -> None:
    try:
        fn(*args)
    except ValueError:
        return
    except Exception as error:
        raise CheckFailed(f"{what} raised {type(error).__name__}, not ValueError: {how}") from error
    raise CheckFailed(f"{what} should raise a ValueError: {how}")


# --- ring attention ---

def _sdpa(q, k, v, mask=None, scale=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _positions_mask(L: int, n: int, rule: str, device: torch.device) -> torch.Tensor:
    """(L, L) masks of full attention that equal the typical wrong causal rings, blocks of n."""
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(L, device=device)[None, :]
    same_or_past_block = j // n <= i // n
    if rule == "block":  # the diagonal block without its causal mask
        return same_or_past_block
    if rule == "future":  # the blocks in the future computed without a mask
        return (j // n != i // n) | (j <= i)
    return same_or_past_block & (j % n <= i % n)  # "every": causal_mask on every block


@exercise
def ring_attention_simulated(fn: Callable) -> None:
    """Check ``ring_attention_simulated(q, k, v, world_size, causal=False)`` against SDPA."""
    P, n, D, DV = 3, 4, 8, 6
    L = P * n
    q, k, v = randn(B, H, L, D, seed=0), randn(B, H, L, D, seed=1), randn(B, H, L, DV, seed=2)
    hint = (f"q, k are (B, H, L, D) = {(B, H, L, D)} and v is (B, H, L, Dv) = {(B, H, L, DV)}; "
            f"with P = {P} each device holds blocks of L / P = {n} tokens (t.split(n, dim=-2))")
    with record_calls(["helpers.flash.block_attention"]) as calls:
        out = call(fn, q, k, v, P, name=f"ring_attention_simulated(q, k, v, {P})", hint=hint)
    out = expect_tensor(out, "ring_attention_simulated(...)")
    expect_shape(out, (B, H, L, DV), "ring_attention_simulated(...)",
                 "concatenate the devices' output blocks, in device order, along dim -2")
    expect(not is_close(out, _sdpa(q, k, v, scale=1.0)),
           "the output equals attention without scaling: pass scale = 1/√D to block_attention")
    expect(len(calls) > 0, "flash.block_attention was never called: compute each device's "
           "attention over the block it holds with flash.block_attention(q_r, k_j, v_j, scale)")
    last_block_only = torch.cat([_sdpa(q[..., r * n:(r + 1) * n, :],
                                       k[..., (r + 1) % P * n:((r + 1) % P + 1) * n, :],
                                       v[..., (r + 1) % P * n:((r + 1) % P + 1) * n, :])
                                 for r in range(P)], dim=-2)
    expect(not is_close(out, last_block_only),
           "each device's output is its attention over the last block it held only: merge "
           "every block into the running (out, lse) with flash.merge_attention instead of "
           "replacing it")
    expect_close(out, _sdpa(q, k, v), "ring_attention_simulated(q, k, v, 3)",
                 "not causal, the ring must equal full attention: every device must see every "
                 "K/V block once, merged with flash.merge_attention")
    expect(len(calls) == P * P, f"flash.block_attention was called {len(calls)} times: a ring "
           f"of P = {P} devices computes one block per device per step, P² = {P * P} calls")
    expect(all(tuple(c["k"].shape) == (B, H, n, D) for _, c in calls),
           f"flash.block_attention got key blocks of other sizes than (B, H, L/P, D) = "
           f"{(B, H, n, D)}: pass one device's block at a time")

    with record_calls(["helpers.flash.block_attention"]) as calls:
        out = call(fn, q, k, v, P, causal=True, name="ring_attention_simulated(..., causal=True)",
                   hint=hint)
    causal = _sdpa(q, k, v, mask=torch.ones(L, L, dtype=torch.bool, device=q.device).tril())
    expect(not is_close(out, _sdpa(q, k, v)), "causal=True gives the full (non-causal) output: "
           "the keys in the future of a query must be hidden")
    expect(not is_close(out, _sdpa(q, k, v, _positions_mask(L, n, "future", q.device))),
           "the blocks in the future leak into the output: device r must skip every block "
           "j > r (at step s it holds the block of device (r - s) mod P)")
    expect(not is_close(out, _sdpa(q, k, v, _positions_mask(L, n, "block", q.device))),
           "the diagonal block (device r holding its own block j = r) needs causal_mask(L/P): "
           "its later keys are in the future of its earlier queries")
    expect(not is_close(out, _sdpa(q, k, v, _positions_mask(L, n, "every", q.device))),
           "causal mask on the wrong blocks: only the diagonal block j == r takes "
           "causal_mask(L/P); blocks j < r are entirely in the past, no mask")
    expect_close(out, causal, "ring_attention_simulated(..., causal=True)",
                 "device r holding block j: j < r no mask, j == r causal_mask(L/P), j > r skip "
                 "(the ring rank order: at step s device r holds the block of device (r - s) mod P)")
    expect(len(calls) == P * (P + 1) // 2, f"causal: flash.block_attention was called "
           f"{len(calls)} times, expected P(P+1)/2 = {P * (P + 1) // 2}: skip (do not compute) "
           "the blocks entirely in the future (j > r) rather than masking all their keys")

    for world_size in (1, L):  # one device; one token per device
        expect_close(fn(q, k, v, world_size, causal=True), causal,
                     f"ring_attention_simulated(..., world_size={world_size}, causal=True)",
                     f"the ring must work for P = {world_size} too")
    layout = q.transpose(-2, -1).contiguous().transpose(-2, -1)  # the same values, strided
    expect_close(fn(layout, k, v, P), _sdpa(q, k, v), "ring_attention_simulated(q as a view)",
                 "q may be a non-contiguous view")
    small = fn(q.float(), k.float(), v.float(), P)
    _expect_dtype(small, torch.float32, "ring_attention_simulated(float32 inputs)")
    _expect_value_error(fn, (q, k, v, 5), f"ring_attention_simulated with L = {L}, P = 5",
                        "L must be a multiple of P; raise ValueError naming both")
    passed("ring_attention_simulated")


def _ring_bytes(batch, heads, seq_len, head_dim, world_size, bytes_per_element=2) -> int:
    block = batch * heads * (seq_len // world_size) * head_dim * bytes_per_element
    return 2 * (world_size - 1) * block


@exercise
def ring_bytes_per_device(fn: Callable) -> None:
    """Check ``ring_bytes_per_device(batch, heads, seq_len, head_dim, world_size,
    bytes_per_element=2)``: K and V blocks, passed on P - 1 times."""
    args = (2, 8, 4096, 64, 4, 4)  # 4 bytes per number: tells "numbers" from "K only"
    got = call(fn, *args, name=f"ring_bytes_per_device{args}")
    expect(isinstance(got, int) and not isinstance(got, bool),
           f"ring_bytes_per_device should return an int, got {type(got).__name__}")
    expected = _ring_bytes(*args)
    block = expected // (2 * 3)  # one block of K, in bytes
    wrong = {2 * 4 * block: "a device passes its block on P - 1 times, not P: after P - 1 "
                            "passes every device has seen every block",
             3 * block: "count K and V: both travel around the ring",
             expected * 4: "that is P times too much: each device sends its own block of L/P "
                           "tokens (not the whole sequence, not the total of all devices)",
             expected // 4: "that counts numbers, not bytes: multiply by bytes_per_element"}
    expect(got not in wrong, wrong.get(got, ""))
    expect(got == expected, f"ring_bytes_per_device{args} = {got}, expected {expected}: "
           "2 (K and V) x (P - 1) passes x batch x heads x (L / P) x head_dim x bytes")
    default = fn(*args[:-1])
    expect(default == _ring_bytes(*args[:-1]), f"ring_bytes_per_device{args[:-1]} = {default}, "
           f"expected {_ring_bytes(*args[:-1])}: bytes_per_element defaults to 2 (bf16)")
    for case in ((1, 32, 2**20, 128, 8, 2), (3, 4, 60, 16, 1, 4), (1, 1, 6, 2, 3, 4)):
        expect(fn(*case) == _ring_bytes(*case), f"ring_bytes_per_device{case} = {fn(*case)}, "
               f"expected {_ring_bytes(*case)}" + (" (one device sends nothing)"
                                                     if case[4] == 1 else ""))
    passed("ring_bytes_per_device")


def _work_reversed(positions: torch.Tensor) -> torch.Tensor:
    """Work per step if device r received from r + 1 (the ring turned the wrong way)."""
    return reference_ring_work(positions.flip(0)).flip(1)


@exercise
def ring_work(fn: Callable) -> None:
    """Check ``ring_work(positions)`` -> (P, P) causal pairs per step and device."""
    contiguous = torch.arange(16).view(4, 4)
    result = expect_tensor(call(fn, contiguous, name="ring_work(positions)",
                                hint="positions is (P, n): row r holds device r's positions"),
                           "ring_work(positions)")
    expect_shape(result, (4, 4), "ring_work(positions)", "one row per step, one column per device")
    expected = reference_ring_work(contiguous)
    expect(not is_close(result.double(), torch.full((4, 4), 16.0)),
           "every entry is n² = 16: count only the pairs whose key is not after the query")
    expect(not is_close(result.double(), expected.T.double()),
           "the table is transposed: entry [s, r] is step s (row), device r (column)")
    expect(not is_close(result.double(), _work_reversed(contiguous).double()),
           "ring rank order wrong: device r receives from device r - 1, so at step s it holds "
           "the keys of device (r - s) mod P, not (r + s) mod P")
    expect(not is_close(result.double(), reference_ring_work(contiguous).double()
                        - torch.tensor([4, 0, 0, 0])[:, None]),
           "a query sees its own position: count the pairs with key position <= query "
           "position (not <)")
    expect_close(result.double(), expected.double(), "ring_work(contiguous positions)",
                 "entry [s, r]: pairs (i, j) with positions[(r - s) % P, j] <= positions[r, i]")
    shuffled = torch.randperm(18, generator=torch.Generator().manual_seed(3)).view(3, 6)
    expect_close(fn(shuffled).double(), reference_ring_work(shuffled).double(),
                 "ring_work(shuffled positions)", "compare positions, not indices: a device "
                 "may hold any tokens, in any order")
    passed("ring_work")


@exercise
def striped_positions(fn: Callable) -> None:
    """Check ``striped_positions(seq_len, world_size)``: device r holds r, r + P, ..."""
    for L, P in ((8, 2), (12, 3), (6, 6), (5, 1)):
        got = expect_tensor(call(fn, L, P, name=f"striped_positions({L}, {P})"),
                            f"striped_positions({L}, {P})")
        expect_shape(got, (P, L // P), f"striped_positions({L}, {P})", "(P, L / P)")
        expect(not (1 < P < L and got.tolist() == torch.arange(L).view(P, -1).tolist()),
               f"striped_positions({L}, {P}) is the contiguous layout: device r holds "
               "r, r + P, r + 2P, ... (a stride of P)")
        expected = [[r + P * i for i in range(L // P)] for r in range(P)]
        expect(got.tolist() == expected, f"striped_positions({L}, {P}) = {got.tolist()}, "
               f"expected {expected}")
        expect(not got.is_floating_point(), "positions should be integers (torch.arange)")
    _expect_value_error(fn, (10, 4), "striped_positions(10, 4)",
                        "10 tokens do not split over 4 devices")
    passed("striped_positions")


# --- linear attention ---

def _elu1(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


def _linear_oracle(q, k, v, causal: bool, phi: Callable = _elu1, top_left: bool = False):
    """Linear attention through PyTorch's SDPA: scores log(φ(q)·φ(k)), zero queries.

    Also builds the typical wrong answers: another feature map, a top-left mask."""
    L, S = q.shape[-2], k.shape[-2]
    similarity = phi(q) @ phi(k).transpose(-2, -1)  # (..., L, S)
    scores = similarity.log()
    if causal:
        mask = torch.ones(L, S, dtype=torch.bool, device=q.device)
        mask = mask.tril() if top_left else mask.tril(S - L)
        scores = scores.masked_fill(~mask, float("-inf"))
    zeros = torch.zeros_like(q[..., :1])
    return F.scaled_dot_product_attention(zeros, zeros[..., :1, :].expand(*k.shape[:-1], 1), v,
                                          attn_mask=scores)


def _linear_direct(q, k, v, causal: bool, phi: Callable = _elu1, top_left: bool = False):
    """(φ(Q)φ(K)ᵀ ⊙ M) V over its row sums, computed directly: the typical wrong answers
    (features that are not positive, a top-left mask) may have negative similarities."""
    L, S = q.shape[-2], k.shape[-2]
    weights = phi(q) @ phi(k).transpose(-2, -1)  # (..., L, S)
    if causal:
        weights = weights.tril(0 if top_left else S - L)
    return (weights @ v) / weights.sum(-1, keepdim=True)


def _unnormalised(q, k, v, causal: bool):
    similarity = _elu1(q) @ _elu1(k).transpose(-2, -1)
    if causal:
        similarity = similarity.tril(k.shape[-2] - q.shape[-2])
    return similarity @ v


@exercise
def linear_attention_parallel(fn: Callable) -> None:
    """Check ``linear_attention_parallel(q, k, v, causal=False)`` against SDPA with scores
    log(φ(q)·φ(k))."""
    L, S, D, DV = 6, 9, 4, 5
    q, k, v = randn(B, H, L, D, seed=10), randn(B, H, S, D, seed=11), randn(B, H, S, DV, seed=12)
    hint = (f"q is (B, H, L, D) = {(B, H, L, D)}, k (B, H, S, D) = {(B, H, S, D)}, v (B, H, S, "
            f"Dv) = {(B, H, S, DV)}: φ(K)ᵀV is (B, H, D, Dv), φ(Q)(φ(K)ᵀV) is (B, H, L, Dv)")
    with record_shapes() as shapes:
        out = call(fn, q, k, v, name="linear_attention_parallel(q, k, v)", hint=hint)
    out = expect_tensor(out, "linear_attention_parallel(q, k, v)")
    expect_shape(out, (B, H, L, DV), "linear_attention_parallel(q, k, v)", "(B, H, L, Dv)")
    expect(bool(torch.isfinite(out).all()), "NaN or inf in the output: is the feature map "
           "positive? φ(x) = elu(x) + 1 keeps every φ(q)·φ(k) > 0, so the normaliser is never 0")
    for phi, mistake in ((F.elu, "elu(x) alone is negative below 0"),
                         (lambda x: x, "the identity can be negative"),
                         (F.relu, "relu is zero below 0")):
        expect(not is_close(out, _linear_direct(q, k, v, False, phi)),
               f"feature map not φ(x) = elu(x) + 1 ({mistake}): linear attention needs "
               "positive features, like the exp of softmax attention")
    expect(not is_close(out, _unnormalised(q, k, v, False)),
           "forgot the normaliser: divide φ(Q)(φ(K)ᵀV) by φ(Q) Σ_j φ(k_j)")
    expect(not is_close(out, _linear_oracle(q / math.sqrt(D), k, v, False)),
           "q was scaled by 1/√D: linear attention has no scale, φ replaces the exponential")
    expect_close(out, _linear_oracle(q, k, v, False), "linear_attention_parallel(q, k, v)",
                 "φ(Q)(φ(K)ᵀV) / (φ(Q) Σ_j φ(k_j)) with φ = elu + 1")
    expect(not any(shape[-2:] == (L, S) for shape in shapes),
           f"not causal, the answer built an (L, S) = {(L, S)} matrix: compute φ(K)ᵀV first "
           "(φ(Q)(φ(K)ᵀV), associativity), which is what makes linear attention O(n)")
    _expect_dtype(fn(q.float(), k.float(), v.float()), torch.float32,
                  "linear_attention_parallel(float32)")

    out = call(fn, q, k, v, causal=True, name="linear_attention_parallel(..., causal=True)",
               hint=hint)
    expect(not is_close(out, _linear_direct(q, k, v, True, top_left=True)),
           f"the causal mask is aligned top left: with L = {L} < S = {S} the queries are the "
           "last L positions, query i sees keys 0 .. S - L + i (causal_mask(L, S))")
    expect(not is_close(out, _unnormalised(q, k, v, True)),
           "forgot the normaliser: divide by the row sums of the masked φ(Q)φ(K)ᵀ")
    masked_numerator = _unnormalised(q, k, v, True)
    all_keys = (_elu1(q) @ _elu1(k).transpose(-2, -1)).sum(-1, keepdim=True)
    expect(not is_close(out, masked_numerator / all_keys),
           "the normaliser sums over every key: mask it like the numerator (the row sums of "
           "the masked matrix)")
    expect_close(out, _linear_oracle(q, k, v, True), "linear_attention_parallel(..., causal=True)",
                 "(φ(Q)φ(K)ᵀ ⊙ causal_mask(L, S)) V, divided by its row sums")
    square = q[..., :1, :].expand(B, H, S, D) + randn(B, H, S, D, seed=13)
    expect_close(fn(square, k, v, causal=True), _linear_oracle(square, k, v, True),
                 "linear_attention_parallel(L = S, causal=True)", "L = S must work too")
    passed("linear_attention_parallel")


def _expect_no_square(shapes: list[tuple[int, ...]], L: int, what: str) -> None:
    expect(not any(len(shape) >= 2 and shape[-2:] == (L, L) for shape in shapes),
           f"{what} built an (L, L) = {(L, L)} matrix: the point of this form is never to")


@exercise
def linear_attention_recurrent(fn: Callable) -> None:
    """Check ``linear_attention_recurrent(q, k, v, state=None) -> (out, (S, z))``: causal
    outputs, the final state, and a sequence fed in two pieces."""
    L, D, DV = 7, 4, 5
    q, k, v = randn(B, H, L, D, seed=20), randn(B, H, L, D, seed=21), randn(B, H, L, DV, seed=22)
    hint = (f"q, k are (B, H, L, D) = {(B, H, L, D)}, v (B, H, L, Dv) = {(B, H, L, DV)}; the "
            f"state S is (B, H, D, Dv) = {(B, H, D, DV)} and z (B, H, D); φ(k_t) v_tᵀ is "
            "phi_k[..., t, :, None] * v[..., t, None, :]")
    with record_shapes() as shapes:
        result = call(fn, q, k, v, name="linear_attention_recurrent(q, k, v)", hint=hint)
    expect(isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], tuple)
           and len(result[1]) == 2, "return (out, (S, z)): the outputs and the final state")
    out, (S, z) = result
    out = expect_tensor(out, "out")
    expect_shape(out, (B, H, L, DV), "out", "(B, H, L, Dv): one output per step")
    expected = _linear_oracle(q, k, v, True)
    expect(bool(torch.isfinite(out[..., 0, :]).all()) and not is_close(
        out[..., 1:, :], _linear_oracle(q[..., 1:, :], k[..., :-1, :], v[..., :-1, :], True)),
           "off by one: query t must see key t as well, so add φ(k_t) v_tᵀ to the state before "
           "reading it")
    expect(not is_close(out, _unnormalised(q, k, v, True)),
           "forgot the normaliser: divide φ(q_t)ᵀ S_t by φ(q_t)ᵀ z_t")
    expect_close(out, expected, "out", "out_t = φ(q_t)ᵀ S_t / φ(q_t)ᵀ z_t with S_t, z_t summed "
                 "over steps 0 .. t")
    expect_close(expect_tensor(S, "S"), _elu1(k).transpose(-2, -1) @ v, "the final state S",
                 "S after the last step is Σ_t φ(k_t) v_tᵀ, (B, H, D, Dv)")
    expect_close(expect_tensor(z, "z"), _elu1(k).sum(-2), "the final state z",
                 "z after the last step is Σ_t φ(k_t), (B, H, D)")
    _expect_no_square(shapes, L, "the recurrent form")

    cut = 3
    first, state = fn(q[..., :cut, :], k[..., :cut, :], v[..., :cut, :])
    given = tuple(t.clone() for t in state)
    second, _ = fn(q[..., cut:, :], k[..., cut:, :], v[..., cut:, :], state)
    expect(all(bool((a == b).all()) for a, b in zip(state, given)),
           "the function changed the state it was given (S += ... in place): use S = S + ...")
    expect_close(torch.cat([first, second], dim=-2), expected, "the sequence fed in two pieces",
                 "start from the given state (S, z) instead of zeros")
    _expect_dtype(fn(q.float(), k.float(), v.float())[0], torch.float32,
                  "linear_attention_recurrent(float32)")
    passed("linear_attention_recurrent")


@exercise
def linear_attention_chunked(fn: Callable) -> None:
    """Check ``linear_attention_chunked(q, k, v, chunk_size)`` against the causal parallel
    form, ragged last chunk included."""
    L, D, DV, C = 10, 4, 5, 4
    q, k, v = randn(B, H, L, D, seed=30), randn(B, H, L, D, seed=31), randn(B, H, L, DV, seed=32)
    hint = (f"q, k are (B, H, L, D) = {(B, H, L, D)}, v (B, H, L, Dv) = {(B, H, L, DV)}; chunk "
            f"c is q[..., c*C:(c+1)*C, :] (the last one may be shorter)")
    with record_shapes() as shapes:
        out = call(fn, q, k, v, C, name=f"linear_attention_chunked(q, k, v, {C})", hint=hint)
    out = expect_tensor(out, f"linear_attention_chunked(q, k, v, {C})")
    expect_shape(out, (B, H, L, DV), f"linear_attention_chunked(q, k, v, {C})",
                 f"L = {L} is not a multiple of {C}: keep the last, shorter chunk")
    expected = _linear_oracle(q, k, v, True)
    expect(not is_close(out, _linear_oracle(q, k, v, False)),
           "the output is not causal: mask each chunk's block φ(Q_c)φ(K_c)ᵀ with causal_mask")
    similarity = _elu1(q) @ _elu1(k).transpose(-2, -1)  # (B, H, L, L): for the wrong answers
    chunk = torch.arange(L, device=q.device) // C
    earlier_or_same = (chunk[None, :] <= chunk[:, None]).to(q.dtype)  # key's chunk <= query's
    causal_within = ((chunk[None, :] == chunk[:, None])
                     & torch.ones(L, L, dtype=torch.bool, device=q.device).tril()).to(q.dtype)
    for weights, mistake in (
            (similarity * earlier_or_same, "keys later in the same chunk leak: mask the "
             "chunk's φ(Q_c)φ(K_c)ᵀ with causal_mask"),
            (similarity * (earlier_or_same + causal_within), "the current chunk is counted "
             "twice: read the state of the earlier chunks, then add φ(K_c)ᵀV_c to it")):
        expect(not is_close(out, (weights @ v) / weights.sum(-1, keepdim=True)), mistake)
    expect_close(out, expected, f"linear_attention_chunked(q, k, v, {C})",
                 "inside a chunk the masked parallel form, across chunks the state S (and z "
                 "in the normaliser) of the earlier chunks")
    _expect_no_square(shapes, L, f"the chunked form with chunk_size={C}")
    for chunk_size in (1, 3, 16):
        expect_close(fn(q, k, v, chunk_size), expected,
                     f"linear_attention_chunked(q, k, v, {chunk_size})",
                     "every chunk size must give the same output")
    _expect_dtype(fn(q.float(), k.float(), v.float(), C), torch.float32,
                  "linear_attention_chunked(float32)")
    passed("linear_attention_chunked")
