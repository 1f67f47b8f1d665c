"""Visible checks for lesson 07 (MQA, GQA, RoPE and sliding windows).

Each check runs the student's function on small fixed inputs, compares it with PyTorch's
own attention (``F.scaled_dot_product_attention`` with ``enable_gqa`` or a mask) or with a
private copy of ``helpers``, and, when it fails, first tries the typical wrong answers, so
that the message names the mistake (a group mapping interleaved instead of blocked, a window
off by one, RoPE pairs split the wrong way, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from helpers.checks import (CheckFailed, call, exercise, expect, expect_close, expect_shape,
                            expect_tensor, is_close, passed, randn, run_without)
from helpers.device import get_device
from helpers.hidden._core import fresh_import, record_shapes

ATTENTION_FUNCTIONS = ["scaled_dot_product_attention", "multi_head_attention_forward"]
ATTENTION_HELPERS = ["helpers.attention.scaled_dot_product_attention",
                     "helpers.attention.MultiHeadAttention",
                     "helpers.transformer.causal_gqa_attention",
                     "helpers.sliding_window.sliding_window_attention"]
COPY_FUNCTIONS = ["repeat_interleave", "repeat", "expand", "expand_as", "tile", "broadcast_to"]
ROPE_HELPERS = ["helpers.rope.rope", "helpers.rope.apply_rope", "helpers.rope.rope_cos_sin",
                "helpers.rope.rotate_half", "helpers.rope.rope_frequencies"]


def _first_match(result: torch.Tensor, mistakes: dict[str, torch.Tensor]) -> None:
    """Fail with the message of the first typical wrong answer that ``result`` equals."""
    for message, wrong in mistakes.items():
        expect(not is_close(result, wrong), message)


# --- 1. KV cache bytes ---------------------------------------------------------------------


def cache_config(window: int | None = None) -> SimpleNamespace:
    """A small config with the attributes of the lesson's ``Config`` (n_heads != n_kv_heads)."""
    return SimpleNamespace(name="check", n_layers=3, d_model=48, n_heads=6, n_kv_heads=2,
                           head_dim=8, window=window)


def cache_formula(config, seq_len: int, batch: int = 1, bytes_per_elem: int = 2) -> int:
    held = seq_len if config.window is None else min(seq_len, config.window)
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * held * batch * bytes_per_elem


@exercise
def kv_cache_bytes(fn: Callable) -> None:
    """Check ``kv_cache_bytes(config, seq_len, batch=1, bytes_per_elem=2)``."""
    config = cache_config()
    hint = ("config has the attributes n_layers, n_heads, n_kv_heads, head_dim and window "
            "(None for full attention)")
    got = run_without("kv_cache_bytes", lambda: call(fn, config, 10, name="kv_cache_bytes("
                       "config, 10)", hint=hint), helpers=["helpers.kv_cache.kv_cache_bytes"])
    expect(isinstance(got, int) and not isinstance(got, bool),
           f"kv_cache_bytes should return an int (a number of bytes), got "
           f"{type(got).__name__} {got!r}: use integer arithmetic (no / and no tensors)")
    expected = cache_formula(config, 10)
    mistakes = {
        expected // 2: "half the expected bytes: the cache holds keys *and* values (a factor 2)",
        expected * config.n_heads // config.n_kv_heads:
            "the cache is sized by the query heads: it holds n_kv_heads key/value heads, "
            "fewer than n_heads with GQA",
        expected * 8: "8 times too many: count bytes (bytes_per_elem each), not bits",
        expected // 2 * config.n_heads // config.n_kv_heads:
            "use n_kv_heads (not n_heads) and count keys and values (factor 2)",
    }
    expect(got not in mistakes or got == expected, mistakes.get(got, ""))
    expect(got == expected, f"kv_cache_bytes(config, 10) = {got}, expected {expected} = 2 · "
           "n_layers · n_kv_heads · head_dim · tokens · batch · bytes_per_elem")
    expect(fn(config, 10, batch=3) == 3 * expected,
           "batch=3 should triple the bytes: every sequence of the batch has its own cache")
    expect(fn(config, 10, bytes_per_elem=4) == 2 * expected,
           "bytes_per_elem=4 (float32) should double the bytes of the default 2 (bfloat16)")
    windowed = cache_config(window=4)
    got = fn(windowed, 10)
    expect(got != expected, "the window is ignored: a config with window=4 holds at most 4 "
           "tokens per layer, min(seq_len, window)")
    expect(got == cache_formula(windowed, 10),
           f"with window=4 and 10 tokens: {got}, expected {cache_formula(windowed, 10)} (4 tokens "
           "held)")
    expect(fn(windowed, 3) == cache_formula(windowed, 3),
           "with window=4 and only 3 tokens seen, the cache holds 3 tokens: min(seq_len, window)")
    llama2_7b = SimpleNamespace(name="Llama 2 7B", n_layers=32, d_model=4096, n_heads=32,
                                n_kv_heads=32, head_dim=128, window=None)
    expect(fn(llama2_7b, 4096) == 2 * 2**30,
           "Llama 2 7B at 4096 tokens in bfloat16 holds exactly 2 GiB of keys and values")
    passed("kv_cache_bytes")


# --- 2. repeat_kv --------------------------------------------------------------------------


@exercise
def repeat_kv(fn: Callable) -> None:
    """Check ``repeat_kv(x, n_rep)``: blocked copies, (B, H_kv, S, D) -> (B, H_kv·n_rep, S, D)."""
    x = randn(2, 3, 5, 4, seed=0)
    hint = ("x is (B, H_kv, S, D): x[:, :, None] is (B, H_kv, 1, S, D); expand its axis 2, "
            "then reshape (not view: an expanded tensor cannot be viewed as fewer dims)")
    out = run_without("repeat_kv", lambda: call(fn, x, 2, name="repeat_kv(x, 2)", hint=hint),
                       torch_functions=["repeat_interleave"],
                       helpers=["helpers.attention.repeat_kv"])
    out = expect_tensor(out, "repeat_kv(x, 2)")
    expect_shape(out, (2, 6, 5, 4), "repeat_kv(x, 2)", "(B, H_kv * n_rep, S, D)")
    expect(not is_close(out, x.repeat(1, 2, 1, 1)),
           "group mapping interleaved: your heads are K/V heads 0, 1, 2, 0, 1, 2, but query "
           "head h reads K/V head h // n_rep, so the copies are blocked: 0, 0, 1, 1, 2, 2 (add "
           "the new axis after H_kv, x[:, :, None], not before it)")
    expect_close(out, x.repeat_interleave(2, dim=1), "repeat_kv(x, 2)",
                 "output head h should be input head h // n_rep")
    expect(fn(x, 1) is x or is_close(fn(x, 1), x), "repeat_kv(x, 1) should return x unchanged")
    strided = randn(2, 4, 3, 5, seed=1).transpose(1, 2)  # (B, H_kv=3, S=4, D=5), not contiguous
    expect_close(call(fn, strided, 3, name="repeat_kv(non-contiguous x, 3)",
                      hint="use reshape, not view: an expanded tensor is not contiguous"),
                 strided.repeat_interleave(3, dim=1), "repeat_kv(non-contiguous x, 3)")
    passed("repeat_kv")


# --- 3. grouped-query attention ------------------------------------------------------------


def _gqa_reference(q, k, v, mask=None, scale=None, interleaved=False):
    """PyTorch's SDPA with enable_gqa (or, for a wrong answer, the interleaved mapping)."""
    group = q.shape[1] // k.shape[1]
    if interleaved:
        k, v = k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


@exercise
def grouped_query_attention(fn: Callable) -> None:
    """Check ``grouped_query_attention(q, k, v, mask=None)`` against SDPA's ``enable_gqa``."""
    B, H, L, S, D, Dv = 2, 6, 3, 7, 8, 5
    q = randn(B, H, L, D, seed=2)
    for H_kv in (2, 1, H):
        k, v = randn(B, H_kv, S, D, seed=3), randn(B, H_kv, S, Dv, seed=4)
        name = f"grouped_query_attention with H={H}, H_kv={H_kv}"
        hint = (f"q is (B, H, L, D) = {(B, H, L, D)}, k is (B, H_kv, S, D) = {(B, H_kv, S, D)}: "
                f"q.reshape(B, H_kv, G * L, D) with G = H // H_kv, then one product with "
                "k.transpose(-2, -1)")
        out = run_without(name, lambda: call(fn, q, k, v, name=name, hint=hint),
                           torch_functions=COPY_FUNCTIONS + ATTENTION_FUNCTIONS,
                           helpers=["helpers.attention.repeat_kv", *ATTENTION_HELPERS])
        out = expect_tensor(out, name)
        expect_shape(out, (B, H, L, Dv), name, "one output per query head: (B, H, L, Dv)")
        if H_kv not in (1, H):
            expect(not is_close(out, _gqa_reference(q, k, v, interleaved=True)),
                   "group mapping interleaved: query head h uses K/V head h % H_kv; it should "
                   "use h // G (blocked: heads 0 .. G-1 share K/V head 0). Reshape q to "
                   "(B, H_kv, G * L, D), with H_kv before G")
        _first_match(out, {
            "output equals unscaled attention: did you divide the scores by √D?":
                _gqa_reference(q, k, v, scale=1.0)})
        expect_close(out, _gqa_reference(q, k, v), name,
                     "query head h should attend with K/V head h // (H // H_kv)")

    k, v = randn(B, 2, S, D, seed=5), randn(B, 2, S, Dv, seed=6)
    causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L)  # (L, S)
    out = fn(q, k, v, mask=causal)
    expect(not is_close(out, _gqa_reference(q, k, v, mask=~causal)),
           "output equals attention with the mask inverted: True means *attend*")
    expect_close(out, _gqa_reference(q, k, v, mask=causal), "out with an (L, S) mask",
                 "mask the scores of every query head of a group: the (L, S) mask must "
                 "broadcast against (B, H_kv, G, L, S), e.g. mask.unsqueeze(-3)")
    padding = torch.arange(S, device=q.device) < torch.tensor([S, 3], device=q.device)[:, None]
    batch_mask = padding[:, None, None, :].expand(B, 1, L, S).clone()  # (B, 1, L, S)
    batch_mask[1, 0, 0] = False  # a query that may see no key
    out = fn(q, k, v, mask=batch_mask)
    expect(bool(torch.isfinite(out).all()), "a query whose mask allows no key gave NaN: use "
           "ref.softmax, which gives zeros for a row that is all -inf")
    expected = _gqa_reference(q, k, v, mask=batch_mask).nan_to_num(0.0)
    expected[1, :, 0] = 0.0
    expect_close(out, expected, "out with a (B, 1, L, S) mask",
                 "a (B, 1, L, S) mask applies to every head: unsqueeze it to (B, 1, 1, L, S)")
    passed("grouped_query_attention")


# --- 4. MHA -> GQA by mean-pooling ---------------------------------------------------------


@exercise
def mean_pool_kv(fn: Callable) -> None:
    """Check ``mean_pool_kv(weight, n_heads, n_kv_heads)`` on weights and biases."""
    H, H_kv, D, d = 6, 2, 3, 5
    G = H // H_kv
    weight = randn(H * D, d, seed=7)
    name = f"mean_pool_kv(weight ({H * D}, {d}), n_heads={H}, n_kv_heads={H_kv})"
    hint = f"weight is (H * D, d_model) = {(H * D, d)}: reshape to (H_kv, G, D, d_model) = " \
           f"{(H_kv, G, D, d)} and average over G"
    out = run_without("mean_pool_kv", lambda: call(fn, weight, H, H_kv, name=name, hint=hint),
                       helpers=["helpers.attention.mean_pool_heads"])
    out = expect_tensor(out, name)
    expect_shape(out, (H_kv * D, d), name, "(n_kv_heads * head_dim, d_model)")
    expected = weight.reshape(H_kv, G, D, d).mean(dim=1).reshape(H_kv * D, d)
    _first_match(out, {
        "group mapping interleaved: you averaged heads g, g + H_kv, g + 2 H_kv, ...; group g "
        "is the consecutive heads g*G .. g*G + G - 1 (reshape to (H_kv, G, D, ...), H_kv first)":
            weight.reshape(G, H_kv, D, d).mean(dim=0).reshape(H_kv * D, d),
        "the heads are summed: take the mean over each group (Ainslie et al. mean-pool)":
            weight.reshape(H_kv, G, D, d).sum(dim=1).reshape(H_kv * D, d),
        "you averaged neighbouring rows, not whole heads: a head is head_dim consecutive rows; "
        "reshape to (H_kv, G, head_dim, ...)":
            weight.reshape(H_kv * D, G, d).mean(dim=1)})
    expect_close(out, expected, name, "group g = mean of heads g*G .. g*G + G - 1")
    bias = randn(H * D, seed=8)
    pooled_bias = expect_tensor(call(fn, bias, H, H_kv, name="mean_pool_kv(bias)",
                                     hint="a bias (H * D,) has no trailing dims: "
                                          "reshape(H_kv, G, D, *weight.shape[1:])"),
                                "mean_pool_kv(bias)")
    expect_close(pooled_bias, bias.reshape(H_kv, G, D).mean(dim=1).reshape(H_kv * D),
                 "mean_pool_kv(bias (H * D,))", "a bias pools like a weight, without d_model")
    expect_close(fn(weight, H, 1), weight.reshape(H, D, d).mean(dim=0), "mean_pool_kv to MQA",
                 "with n_kv_heads=1 every head is averaged into one")
    expect_close(fn(weight, H, H), weight, "mean_pool_kv with n_kv_heads = n_heads",
                 "no pooling when every query head keeps its K/V head")
    passed("mean_pool_kv")


# --- 5. RoPE -------------------------------------------------------------------------------


def _angles(positions: torch.Tensor, D: int, base: float, exponent_step: int = 2) -> torch.Tensor:
    theta = base ** (-torch.arange(0, D // 2, device=positions.device).double()
                     * exponent_step / D)  # (D/2,)
    return positions.double()[:, None] * theta[None, :]  # (L, D/2)


def _rope_variants(x: torch.Tensor, positions: torch.Tensor, base: float
                   ) -> dict[str, torch.Tensor]:
    """Typical wrong RoPEs, computed in float64."""
    x = x.double()
    D = x.shape[-1]
    angles = _angles(positions, D, base)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    half = torch.cat([-x2, x1], dim=-1)
    even, odd = x[..., 0::2], x[..., 1::2]
    pairs = torch.stack([even * angles.cos() - odd * angles.sin(),
                         even * angles.sin() + odd * angles.cos()], dim=-1).flatten(-2)
    wrong_speed = _angles(positions, D, base, exponent_step=1)
    cos_w, sin_w = torch.cat([wrong_speed.cos()] * 2, -1), torch.cat([wrong_speed.sin()] * 2, -1)
    start = _angles(torch.arange(len(positions), device=x.device), D, base)
    cos_0, sin_0 = torch.cat([start.cos()] * 2, -1), torch.cat([start.sin()] * 2, -1)
    return {
        "RoPE pairs split the wrong way: you rotated neighbours (x_0, x_1), (x_2, x_3), ... "
        "as in the RoFormer paper; Hugging Face's Llama pairs the two halves, x_i with "
        "x_{i + D/2} (rotate_half)": pairs,
        "the rotation goes the wrong way: rotate_half(x1, x2) is (-x2, x1), and x' = x cos + "
        "rotate_half(x) sin": x * cos - half * sin,
        "the frequencies are off: θ_i = base^(-2i/D) for i = 0 .. D/2 - 1, i.e. "
        "base ** (-arange(0, D, 2) / D)": x * cos_w + half * sin_w,
        "the positions are ignored: the rotation must use the given positions (after a cache "
        "they continue from where it stopped), not 0 .. L-1": x * cos_0 + half * sin_0,
    }


@exercise
def apply_rope(fn: Callable) -> None:
    """Check ``apply_rope(x, positions, base=10000.0)`` against Hugging Face's convention."""
    rope = fresh_import("helpers.rope")
    x = randn(2, 3, 5, 8, seed=9, dtype=torch.float32)
    positions = torch.tensor([3, 4, 5, 6, 7], device=x.device)
    name = "apply_rope(x, positions)"
    hint = ("x is (B, H, L, D) and positions (L,): the angles positions[:, None] * theta[None, :]"
            " are (L, D/2); concatenate them twice to (L, D) so they broadcast against x")
    out = run_without("apply_rope", lambda: call(fn, x, positions, name=name, hint=hint),
                       helpers=ROPE_HELPERS)
    out = expect_tensor(out, name)
    expect_shape(out, x.shape, name, "RoPE keeps the shape of x")
    expected = rope.rope(x, positions)
    if not is_close(out, expected, atol=1e-4):
        _first_match(out.double(), _rope_variants(x, positions, 10000.0))
    expect_close(out, expected, name, "x' = x cos + rotate_half(x) sin with the angles "
                 "positions · base^(-2i/D), each angle twice (cat(angles, angles))", atol=1e-4)
    expect(out.dtype == x.dtype, f"apply_rope returned {out.dtype} for a {x.dtype} input: cast "
           "cos and sin to x.dtype")
    expect_close(fn(x, positions, base=500000.0), rope.rope(x, positions, 500000.0),
                 "apply_rope(x, positions, base=500000.0)",
                 "the base argument is ignored: θ_i = base^(-2i/D)", atol=1e-4)
    wide = randn(1, 2, 4, 16, seed=10, dtype=torch.float32)
    far = torch.tensor([0, 100, 101, 2000], device=wide.device)
    expect_close(fn(wide, far), rope.rope(wide, far), "apply_rope with D=16, positions up to 2000",
                 "compute the angles in float32 from the integer positions", atol=1e-3)
    low = fn(x.to(torch.bfloat16), positions)
    expect(isinstance(low, torch.Tensor) and low.dtype == torch.bfloat16,
           "apply_rope should return the dtype of x (bfloat16 in, bfloat16 out)")
    passed("apply_rope")


# --- 6. sliding-window mask with global tokens ---------------------------------------------


def _mask_variants(L: int, window: int, n_global: int, device) -> dict[str, torch.Tensor]:
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(L, device=device)[None, :]
    glob = j < n_global
    variants = {
        "window off by one: each query sees window + 1 keys; key j is visible when "
        "i - window < j <= i (strictly greater)": (j <= i) & ((j >= i - window) | glob),
        "window off by one: each query sees only window - 1 keys; the window counts the query "
        "itself, i - window < j <= i": (j <= i) & ((j > i - window + 1) | glob),
        "the mask is not causal: a query sees keys after it; require j <= i":
            ((i - j).abs() < window) | glob,
        "a global token is visible to queries before it: global keys still need j <= i":
            ((j <= i) & (j > i - window)) | glob,
    }
    if n_global:
        variants["n_global is ignored: the first n_global keys are visible to every later "
                 "query"] = (j <= i) & (j > i - window)
    return variants


@exercise
def local_global_mask(fn: Callable) -> None:
    """Check ``local_global_mask(L, window, n_global=0)`` against the reference mask."""
    attention = fresh_import("helpers.attention")
    device = get_device()
    for L, window, n_global in ((8, 3, 0), (10, 4, 2), (6, 1, 0), (5, 9, 0), (9, 2, 3)):
        name = f"local_global_mask(L={L}, window={window}, n_global={n_global})"
        hint = ("compare i = arange(L)[:, None] with j = arange(L)[None, :]: an (L, 1) and a "
                "(1, L) tensor broadcast to (L, L)")
        mask = run_without("local_global_mask", lambda: call(
            fn, L, window, n_global, device=device, name=name, hint=hint),
            helpers=["helpers.attention.sliding_window_mask"])
        mask = expect_tensor(mask, name)
        expect_shape(mask, (L, L), name, "one row per query, one column per key")
        expect(mask.dtype == torch.bool, f"{name} has dtype {mask.dtype}: return a boolean mask "
               "(True = attend)")
        expected = attention.sliding_window_mask(L, window, n_global=n_global, device=device)
        if not torch.equal(mask, expected):
            for message, wrong in _mask_variants(L, window, n_global, device).items():
                expect(not torch.equal(mask, wrong), f"{name}: {message}")
            wrong = int((mask != expected).sum())
            raise CheckFailed(f"{name} differs from the reference in {wrong} "
                              "entries: query i sees key j when i - window < j <= i, or when "
                              "j < n_global and j <= i")
    expect(torch.equal(fn(6, 2), attention.sliding_window_mask(6, 2)),
           "n_global should default to 0 (no global token)")
    try:
        fn(4, 0)
    except ValueError:
        pass
    except Exception as error:
        raise CheckFailed(f"window=0 raised {type(error).__name__}, not ValueError") from error
    else:
        raise CheckFailed("window=0 should raise a ValueError: a query always sees itself")
    passed("local_global_mask")


# --- 7. banded attention -------------------------------------------------------------------


def quadratic_tensor(run: Callable[[], object], L: int) -> tuple[object, tuple[int, ...] | None]:
    """``run()``'s result, and the shape of a tensor it made with two dims of at least L (an
    (L, L) matrix of scores or a mask, whatever its other dims), or None.

    The other dims of a legitimate banded computation (batch, heads, blocks, window, head
    size) must all be below L for this to tell them apart.
    """
    with record_shapes() as shapes:
        result = run()
    return result, next((shape for shape in shapes if sum(size >= L for size in shape) >= 2),
                        None)


def _masked(q, k, v, window: int, scale: float | None = None) -> torch.Tensor:
    L = q.shape[-2]
    i = torch.arange(L, device=q.device)[:, None]
    j = torch.arange(L, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (j > i - window),
                                          scale=scale)


@exercise
def banded_attention(fn: Callable) -> None:
    """Check ``banded_attention(q, k, v, window)``: equal to masked attention, no (L, L) tensor."""
    B, H, D, window = 1, 2, 8, 4
    for L in (16 * window + 3, 16 * window, 3):
        q, k, v = (randn(B, H, L, D, seed=11 + s) for s in range(3))
        name = f"banded_attention(q, k, v, window={window}) with L={L}"
        hint = ("pad k and v in front with window - 1 rows and q at the end to a multiple of the "
                "window (F.pad(x, (0, 0, front, back)) pads dim -2), then "
                "unfold(2, 2 * window - 1, window)")
        out, quadratic = run_without(name, lambda: quadratic_tensor(
            lambda: call(fn, q, k, v, window, name=name, hint=hint), L),
            torch_functions=ATTENTION_FUNCTIONS,
            helpers=["helpers.attention.sliding_window_mask", *ATTENTION_HELPERS])
        out = expect_tensor(out, name)
        expect_shape(out, (B, H, L, D), name, "one output per query, (B, H, L, D)")
        if L > 2 * window:
            expect(quadratic is None, f"{name}: a tensor of shape {quadratic} was built, an "
                   f"(L, L) = ({L}, {L}) matrix: score each block of queries against "
                   "its own 2W - 1 keys only (that is the point: O(L·W), not O(L²))")
        expected = _masked(q, k, v, window)
        if is_close(out, expected):
            continue
        _first_match(out, {
            "window off by one: each query sees window + 1 keys (i - window < j <= i)":
                _masked(q, k, v, window + 1),
            "window off by one: each query sees window - 1 keys (the window includes the "
            "query itself)": _masked(q, k, v, window - 1),
            "output equals unscaled attention: divide the scores by √D": _masked(q, k, v, window,
                                                                                 scale=1.0)})
        early = min(window - 1, L)
        expect(is_close(out[..., :early, :], expected[..., :early, :])
               or not is_close(out[..., early:, :], expected[..., early:, :]),
               "only the first window - 1 queries are wrong: they attend to the zero padding "
               "keys in front of the sequence (a zero key scores 0, not -inf); mask the "
               "padding in block 0")
        last = L - L % window if L % window else L - window
        expect(is_close(out[..., :last, :], expected[..., :last, :]),
               "the queries are wrong inside the band: query r of a block sees the slice keys "
               "r .. r + window - 1 (slice coordinates), nothing after itself")
        expect_close(out, expected, name, "the last block is wrong: pad the queries at the end "
                     "to a multiple of the window and drop the padded rows at the end")
    passed("banded_attention")
