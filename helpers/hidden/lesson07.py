"""Hidden tests for lesson 07 (MQA, GQA, RoPE and sliding windows): fresh shapes, dtypes and
seeds, references from a private copy of ``helpers`` or plain arithmetic, and no shortcut
through the function the exercise asks for.

Sizes are drawn so that every typical wrong answer shows on every draw: at least two K/V
heads and two query heads per group (an interleaved mapping differs from a blocked one),
head_dim >= 4 (RoPE has two pairs per half), a window >= 2 and sequences longer than two
windows that are not a multiple of it.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch

from helpers import attention
from helpers.checks import lesson07 as visible
from helpers.device import get_device
from helpers.hidden._core import expect, expect_close, forbid, randn, random_seed

DTYPES = (torch.float32, torch.float64)
TOLERANCES = {torch.float32: {"atol": 1e-5, "rtol": 1e-4},
              torch.float64: {"atol": 1e-10, "rtol": 1e-9}}


def _generator() -> tuple[torch.Generator, int]:
    seed = random_seed()
    return torch.Generator().manual_seed(seed), seed


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """An integer in low .. high, inclusive."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _expect_dtype(value: object, dtype: torch.dtype, what: str) -> None:
    expect(isinstance(value, torch.Tensor), f"{what}: expected a tensor, got "
            f"{type(value).__name__}")
    expect(value.dtype == dtype, f"{what}: dtype {value.dtype}, expected {dtype}")


def kv_cache_bytes(student: Callable) -> None:
    """Random configs (n_heads > n_kv_heads, windows below and above seq_len), batches, dtypes."""
    generator, seed = _generator()
    for trial in range(6):
        n_kv = _randint(generator, 1, 8)
        window = (None, _randint(generator, 2, 64), 10**6)[trial % 3]
        config = SimpleNamespace(name="hidden", n_layers=_randint(generator, 1, 80),
                                 d_model=4096, n_heads=n_kv * _randint(generator, 2, 8),
                                 n_kv_heads=n_kv, head_dim=2 ** _randint(generator, 3, 8),
                                 window=window)
        seq_len = _randint(generator, 65, 10**5)
        batch, bytes_per_elem = _randint(generator, 2, 16), (1, 2, 4)[trial % 3]
        with forbid(helpers=["helpers.kv_cache.kv_cache_bytes"]):
            got = student(config, seq_len, batch=batch, bytes_per_elem=bytes_per_elem)
        held = seq_len if window is None else min(seq_len, window)
        expected = 2 * config.n_layers * n_kv * config.head_dim * held * batch * bytes_per_elem
        expect(isinstance(got, int) and got == expected,
                f"kv_cache_bytes({vars(config)}, seq_len={seq_len}, batch={batch}, "
                f"bytes_per_elem={bytes_per_elem}) = {got!r}, expected {expected} (seed {seed})")


def repeat_kv(student: Callable) -> None:
    """Blocked copies for random shapes and n_rep >= 2, a non-contiguous input, n_rep = 1."""
    generator, seed = _generator()
    for dtype in DTYPES:
        B, H_kv, S, D = (_randint(generator, 1, 3), _randint(generator, 2, 4),
                         _randint(generator, 1, 9), _randint(generator, 1, 8))
        n_rep = _randint(generator, 2, 4)
        x = randn(generator, B, S, H_kv, D, dtype=dtype).transpose(1, 2)  # not contiguous
        with forbid(torch_functions=["repeat_interleave"],
                    helpers=["helpers.attention.repeat_kv"]):
            out = student(x, n_rep)
            same = student(x, 1)
        what = f"repeat_kv, x {tuple(x.shape)}, n_rep={n_rep}, {dtype}, seed {seed}"
        _expect_dtype(out, dtype, what)
        index = torch.arange(H_kv * n_rep, device=x.device) // n_rep  # output head -> input head
        expect_close(out, x[:, index], what, atol=0, rtol=0)
        expect_close(same, x, f"repeat_kv(x, 1), seed {seed}", atol=0, rtol=0)


def grouped_query_attention(student: Callable) -> None:
    """GQA with G >= 2 and H_kv >= 2, plus MQA; no mask, an (L, S) and a (B, 1, L, S) mask."""
    generator, seed = _generator()
    for dtype in DTYPES:
        for H_kv in (_randint(generator, 2, 3), 1):
            G = _randint(generator, 2, 3)
            B, L = _randint(generator, 1, 3), _randint(generator, 2, 6)
            S = _randint(generator, 3, 9)
            D, Dv = _randint(generator, 2, 16), _randint(generator, 1, 8)
            q = randn(generator, B, H_kv * G, L, D, dtype=dtype)
            k = randn(generator, B, H_kv, S, D, dtype=dtype)
            v = randn(generator, B, H_kv, S, Dv, dtype=dtype)
            causal = attention.causal_mask(L, S, device=q.device)  # (L, S)
            blind = (torch.rand(B, 1, L, S, generator=generator) < 0.7).to(q.device)
            blind[..., 0, :] = False  # a query that sees nothing
            blind[..., 1, :2] = True  # and one that sees at least two keys
            for mask in (None, causal, blind):
                with forbid(torch_functions=visible.COPY_FUNCTIONS + visible.ATTENTION_FUNCTIONS,
                            helpers=["helpers.attention.repeat_kv", *visible.ATTENTION_HELPERS]):
                    out = student(q, k, v, mask=mask) if mask is not None else student(q, k, v)
                what = (f"grouped_query_attention, q {tuple(q.shape)}, k {tuple(k.shape)}, "
                        f"mask {None if mask is None else tuple(mask.shape)}, {dtype}, seed {seed}")
                _expect_dtype(out, dtype, what)
                index = torch.arange(H_kv * G, device=q.device) // G  # query head -> K/V head
                expected, _ = attention.scaled_dot_product_attention(
                    q.double(), k.double()[:, index], v.double()[:, index], mask=mask)
                expect_close(out, expected, what, **TOLERANCES[dtype])


def mean_pool_kv(student: Callable) -> None:
    """Weights with trailing dims and biases, G >= 2 and H_kv >= 2, and MQA."""
    generator, seed = _generator()
    for dtype in DTYPES:
        for H_kv in (_randint(generator, 2, 4), 1):
            G, D = _randint(generator, 2, 4), _randint(generator, 1, 6)
            H = H_kv * G
            for trailing in ((_randint(generator, 1, 7),), ()):
                weight = randn(generator, H * D, *trailing, dtype=dtype)
                with forbid(helpers=["helpers.attention.mean_pool_heads"]):
                    out = student(weight, H, H_kv)
                what = (f"mean_pool_kv, weight {tuple(weight.shape)}, n_heads={H}, "
                        f"n_kv_heads={H_kv}, {dtype}, seed {seed}")
                _expect_dtype(out, dtype, what)
                heads = weight.double().reshape(H, D, *trailing)
                expected = torch.cat([heads[g * G:(g + 1) * G].mean(dim=0) for g in range(H_kv)])
                expect_close(out, expected, what, **TOLERANCES[dtype])


def apply_rope(student: Callable) -> None:
    """Random head sizes, bases and shifted positions, against float64 arithmetic."""
    generator, seed = _generator()
    for dtype in DTYPES:
        B, H, L = _randint(generator, 1, 3), _randint(generator, 1, 3), _randint(generator, 2, 7)
        D = 2 * _randint(generator, 2, 16)  # >= 4: two pairs per half
        start = _randint(generator, 1, 40)
        positions = start + torch.randperm(48, generator=generator)[:L].sort().values
        positions = positions.to(get_device())
        # never the default 10000: an answer that ignores the argument base would pass
        base = (500000.0, float(_randint(generator, 100, 5000)))[_randint(generator, 0, 1)]
        x = randn(generator, B, H, L, D, dtype=dtype)
        with forbid(helpers=visible.ROPE_HELPERS):
            out = student(x, positions, base=base)
        what = (f"apply_rope, x {tuple(x.shape)}, positions {positions.tolist()}, base {base}, "
                f"{dtype}, seed {seed}")
        _expect_dtype(out, dtype, what)
        theta = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
        angles = positions.cpu().double()[:, None] * theta[None, :]  # (L, D/2)
        cos, sin = angles.cos().to(x.device), angles.sin().to(x.device)
        x1, x2 = x.double()[..., : D // 2], x.double()[..., D // 2:]
        expected = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        # the angles are float32 (as in Hugging Face): about 1e-5 at positions below 90
        expect_close(out, expected, what, atol=1e-4, rtol=1e-4)


def local_global_mask(student: Callable) -> None:
    """Random lengths, windows >= 2 and a few global tokens, against a mask made entry by entry."""
    generator, seed = _generator()
    for n_global in (0, _randint(generator, 2, 4)):  # >= 2: a non-causal global key shows
        window = _randint(generator, 2, 6)
        L = window + n_global + _randint(generator, 2, 12)
        with forbid(helpers=["helpers.attention.sliding_window_mask"]):
            mask = student(L, window, n_global)
        what = f"local_global_mask(L={L}, window={window}, n_global={n_global}), seed {seed}"
        _expect_dtype(mask, torch.bool, what)
        expected = torch.tensor([[j <= i and (j > i - window or j < n_global) for j in range(L)]
                                 for i in range(L)])
        expect(tuple(mask.shape) == (L, L) and torch.equal(mask.cpu(), expected),
                f"{what}: the mask differs from i - window < j <= i (or j < n_global, j <= i)")


def banded_attention(student: Callable) -> None:
    """Random windows >= 2, L > 8 windows and not a multiple of it, D < L, no (L, L) tensor."""
    generator, seed = _generator()
    for dtype in DTYPES:
        window = _randint(generator, 2, 6)
        L = window * _randint(generator, 9, 14) + _randint(generator, 1, window - 1)
        B, H, D = _randint(generator, 1, 2), _randint(generator, 1, 2), _randint(generator, 2, 16)
        q, k, v = (randn(generator, B, H, L, D, dtype=dtype) for _ in range(3))
        with forbid(torch_functions=visible.ATTENTION_FUNCTIONS,
                    helpers=["helpers.attention.sliding_window_mask", *visible.ATTENTION_HELPERS]):
            out, quadratic = visible.quadratic_tensor(lambda: student(q, k, v, window), L)
        what = (f"banded_attention, q {tuple(q.shape)}, window {window}, {dtype}, seed {seed}")
        expect(quadratic is None, f"{what}: a tensor of shape {quadratic} was built, as large "
                "as an (L, L) matrix: the banded computation must stay O(L·W)")
        _expect_dtype(out, dtype, what)
        i = torch.arange(L)[:, None]
        j = torch.arange(L)[None, :]
        mask = ((j <= i) & (j > i - window)).to(q.device)
        expected, _ = attention.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                             mask=mask)
        expect_close(out, expected, what, **TOLERANCES[dtype])
