"""Hidden tests for lesson 08 (ring attention and linear attention): fresh shapes, dtypes and
seeds, references from a private copy of ``helpers``, and no shortcut through the function
the exercise asks for.

Sizes are drawn so that every typical wrong answer fails on every draw: a ring of at least
two devices with blocks of at least two tokens (a missing merge, a mask on the wrong block),
three devices for the ring's direction (with two, r + 1 and r - 1 are the same device),
``D >= 2`` (a stray 1/√D), ``L < S`` for causal linear attention (a top-left mask), and
sequences longer than the head size and the chunk (an (L, L) matrix is then unambiguous).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from helpers import attention as reference_attention
from helpers import linear_attention as reference_linear
from helpers import ring as reference_ring
from helpers.hidden._core import (HiddenTestFailed, expect_close, expect_tensor, forbid, randn,
                                  random_seed, record_calls, record_shapes, sizes)

DTYPES = (torch.float32, torch.float64)
TOLERANCES = {torch.float32: {"atol": 1e-5, "rtol": 1e-4},
              torch.float64: {"atol": 1e-10, "rtol": 1e-9}}
ATTENTION_FUNCTIONS = ["scaled_dot_product_attention", "multi_head_attention_forward"]
ATTENTION_HELPERS = ["helpers.attention.scaled_dot_product_attention",
                     "helpers.attention.MultiHeadAttention"]
LINEAR_HELPERS = ["helpers.linear_attention.linear_attention",
                  "helpers.linear_attention.parallel_linear_attention",
                  "helpers.linear_attention.recurrent_linear_attention",
                  "helpers.linear_attention.chunked_linear_attention",
                  "helpers.linear_attention.LinearAttention"]


def _expect_value_error(run: Callable[[], object], what: str) -> None:
    try:
        run()
    except ValueError:
        return
    except Exception as error:
        raise HiddenTestFailed(f"{what}: raised {type(error).__name__}, expected ValueError")
    raise HiddenTestFailed(f"{what}: expected a ValueError")


def _attention(q, k, v, causal: bool) -> torch.Tensor:
    """Full softmax attention in float64 from the private reference."""
    mask = reference_attention.causal_mask(q.shape[-2], k.shape[-2], device=q.device)
    return reference_attention.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), mask=mask if causal else None)[0]


def ring_attention_simulated(student: Callable) -> None:
    """Equal to full attention, causal and not, float32 and float64; one block_attention call
    per device and step (causal: only the blocks not in the future), on blocks of L/P."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    for dtype in DTYPES:
        n = sizes(generator, B=(1, 3), H=(1, 3), P=(2, 4), block=(2, 4), D=(2, 8), Dv=(1, 6))
        L = n["P"] * n["block"]
        q = randn(generator, n["B"], n["H"], L, n["D"], dtype=dtype)
        k = randn(generator, n["B"], n["H"], L, n["D"], dtype=dtype)
        v = randn(generator, n["B"], n["H"], L, n["Dv"], dtype=dtype)
        for causal in (False, True):
            what = f"ring_attention_simulated, {n}, causal={causal}, {dtype}, seed {seed}"
            with forbid(torch_functions=ATTENTION_FUNCTIONS,
                        helpers=["helpers.ring.ring_attention_simulated",
                                 "helpers.ring.ring_attention", *ATTENTION_HELPERS]):
                with record_calls(["helpers.flash.block_attention"]) as calls:
                    out = student(q, k, v, n["P"], causal=causal)
            out = expect_tensor(out, dtype, what)
            expect_close(out, _attention(q, k, v, causal), what, **TOLERANCES[dtype])
            P = n["P"]
            expected_calls = P * (P + 1) // 2 if causal else P * P
            if len(calls) != expected_calls:
                raise HiddenTestFailed(f"{what}: flash.block_attention called {len(calls)} "
                                       f"times, expected {expected_calls}")
            if any(c["k"].shape[-2] != n["block"] for _, c in calls):
                raise HiddenTestFailed(f"{what}: block_attention got key blocks of other "
                                       f"sizes than L / P = {n['block']}")
    _expect_value_error(lambda: student(q, k, v, L + 1), f"ring_attention_simulated with L = "
                        f"{L} and P = {L + 1}, seed {seed}")


def ring_bytes_per_device(student: Callable) -> None:
    """Bytes per device for random configurations, with and without bytes_per_element."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(4):
        n = sizes(generator, batch=(1, 4), heads=(1, 16), block=(1, 4096), head_dim=(1, 256),
                   P=(2, 16), bytes=(1, 8))
        args = (n["batch"], n["heads"], n["block"] * n["P"], n["head_dim"], n["P"])
        expected = 2 * (n["P"] - 1) * n["batch"] * n["heads"] * n["block"] * n["head_dim"]
        for given, per_element in (((n["bytes"],), n["bytes"]), ((), 2)):
            got = student(*args, *given)
            if isinstance(got, bool) or not isinstance(got, int):
                raise HiddenTestFailed(f"ring_bytes_per_device{args + given}: expected an int, "
                                       f"got {type(got).__name__}, seed {seed}")
            if got != expected * per_element:
                raise HiddenTestFailed(f"ring_bytes_per_device{args + given} = {got}, "
                                       f"expected {expected * per_element}, seed {seed}")
    if student(2, 3, 40, 8, 1) != 0:
        raise HiddenTestFailed("ring_bytes_per_device with one device should be 0")


def ring_work(student: Callable) -> None:
    """Work tables of random layouts (any tokens on any device), against the reference."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(3):
        n = sizes(generator, P=(3, 5), block=(2, 4))
        positions = torch.randperm(n["P"] * n["block"], generator=generator).view(n["P"], -1)
        with forbid(helpers=["helpers.ring.ring_work"]):
            got = student(positions.clone())
        what = f"ring_work of positions {positions.tolist()}, seed {seed}"
        got = expect_tensor(got, None, what)
        expected = reference_ring.ring_work(positions)
        if tuple(got.shape) != tuple(expected.shape) or not bool((got.double().cpu()
                                                                  == expected.double()).all()):
            raise HiddenTestFailed(f"{what}: got {got.tolist()}, expected {expected.tolist()}")


def striped_positions(student: Callable) -> None:
    """Random sequence lengths and device counts; a length that does not split."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(3):
        n = sizes(generator, P=(2, 7), block=(2, 6))
        L = n["P"] * n["block"]
        with forbid(helpers=["helpers.ring.layout_positions"]):
            got = expect_tensor(student(L, n["P"]), None, f"striped_positions({L}, {n['P']})")
        expected = [[r + n["P"] * i for i in range(n["block"])] for r in range(n["P"])]
        if got.is_floating_point() or got.tolist() != expected:
            raise HiddenTestFailed(f"striped_positions({L}, {n['P']}) = {got.tolist()}, "
                                   f"expected {expected}, seed {seed}")
    _expect_value_error(lambda: student(L + 1, n["P"]), f"striped_positions({L + 1}, {n['P']})")


def _linear_reference(q, k, v, causal: bool) -> torch.Tensor:
    return reference_linear.linear_attention(q.double(), k.double(), v.double(), causal=causal)


def _no_square(shapes: list[tuple[int, ...]], rows: int, cols: int, what: str) -> None:
    if any(len(shape) >= 2 and shape[-2:] == (rows, cols) for shape in shapes):
        raise HiddenTestFailed(f"{what}: built an ({rows}, {cols}) matrix, which this form "
                               "must not")


def linear_attention_parallel(student: Callable) -> None:
    """Not causal (no (L, S) matrix) and causal with L < S, against the reference."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    for dtype in DTYPES:
        n = sizes(generator, B=(1, 3), H=(1, 3), L=(7, 12), extra=(1, 4), D=(2, 6), Dv=(1, 6))
        S = n["L"] + n["extra"]
        q = randn(generator, n["B"], n["H"], n["L"], n["D"], dtype=dtype)
        k = randn(generator, n["B"], n["H"], S, n["D"], dtype=dtype)
        v = randn(generator, n["B"], n["H"], S, n["Dv"], dtype=dtype)
        for causal in (False, True):
            what = f"linear_attention_parallel, {n}, S={S}, causal={causal}, {dtype}, seed {seed}"
            with forbid(torch_functions=ATTENTION_FUNCTIONS,
                        helpers=[*LINEAR_HELPERS, *ATTENTION_HELPERS]):
                with record_shapes() as shapes:
                    out = student(q, k, v, causal=causal)
            out = expect_tensor(out, dtype, what)
            expect_close(out, _linear_reference(q, k, v, causal), what, **TOLERANCES[dtype])
            if not causal:
                _no_square(shapes, n["L"], S, what)


def linear_attention_recurrent(student: Callable) -> None:
    """Outputs and final state, and a sequence fed in two pieces at a random cut."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    for dtype in DTYPES:
        n = sizes(generator, B=(1, 3), H=(1, 3), L=(8, 14), D=(2, 6), Dv=(1, 6), cut=(1, 7))
        q, k = (randn(generator, n["B"], n["H"], n["L"], n["D"], dtype=dtype) for _ in range(2))
        v = randn(generator, n["B"], n["H"], n["L"], n["Dv"], dtype=dtype)
        what = f"linear_attention_recurrent, {n}, {dtype}, seed {seed}"
        with forbid(helpers=LINEAR_HELPERS):
            with record_shapes() as shapes:
                result = student(q, k, v)
            cut = n["cut"]
            first, state = student(q[..., :cut, :], k[..., :cut, :], v[..., :cut, :])
            given = tuple(t.clone() for t in state)
            second, _ = student(q[..., cut:, :], k[..., cut:, :], v[..., cut:, :], state)
        if not (isinstance(result, tuple) and len(result) == 2 and len(result[1]) == 2):
            raise HiddenTestFailed(f"{what}: expected (out, (S, z))")
        out, (S, z) = result
        expected = _linear_reference(q, k, v, True)
        expect_close(expect_tensor(out, dtype, what), expected, f"{what}: out",
                     **TOLERANCES[dtype])
        phi_k = reference_linear.elu_feature_map(k.double())
        expect_close(expect_tensor(S, dtype, what), phi_k.transpose(-2, -1) @ v.double(),
                     f"{what}: S", **TOLERANCES[dtype])
        expect_close(expect_tensor(z, dtype, what), phi_k.sum(-2), f"{what}: z",
                     **TOLERANCES[dtype])
        expect_close(torch.cat([first, second], dim=-2), expected,
                     f"{what}: fed in two pieces, cut at {cut}", **TOLERANCES[dtype])
        if not all(bool((a == b).all()) for a, b in zip(state, given)):
            raise HiddenTestFailed(f"{what}: the state passed in was modified")
        _no_square(shapes, n["L"], n["L"], what)


def linear_attention_chunked(student: Callable) -> None:
    """Random lengths and chunk sizes (a ragged last chunk), no (L, L) matrix."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    for dtype in DTYPES:
        n = sizes(generator, B=(1, 3), H=(1, 3), chunk=(3, 6), chunks=(2, 3), rest=(1, 5),
                   D=(2, 6), Dv=(1, 6))
        C = n["chunk"]
        L = C * n["chunks"] + min(n["rest"], C - 1)  # a ragged last chunk; L >= 7 > C, D, Dv
        q, k = (randn(generator, n["B"], n["H"], L, n["D"], dtype=dtype) for _ in range(2))
        v = randn(generator, n["B"], n["H"], L, n["Dv"], dtype=dtype)
        what = f"linear_attention_chunked, {n}, L={L}, {dtype}, seed {seed}"
        with forbid(torch_functions=ATTENTION_FUNCTIONS, helpers=LINEAR_HELPERS):
            with record_shapes() as shapes:
                out = student(q, k, v, C)
        expect_close(expect_tensor(out, dtype, what), _linear_reference(q, k, v, True), what,
                     **TOLERANCES[dtype])
        _no_square(shapes, L, L, what)
