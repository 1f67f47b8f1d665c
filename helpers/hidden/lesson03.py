"""Hidden tests of lesson 03 (multi-head attention): fresh shapes, dtypes and seeds.

Oracles are PyTorch's own: ``torch.chunk`` for the head layout and ``nn.MultiheadAttention``
for the module, its parameter count and its weights. Answers that only call the reference
(``helpers.attention``) or PyTorch's fused MHA fail.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from helpers.hidden import _core

FORBIDDEN_MHA = ["multi_head_attention_forward"]
FORBIDDEN_HELPERS = ["helpers.attention.MultiHeadAttention"]


def _shape(rng: random.Random, smallest: int = 1) -> tuple[int, int, int, int]:
    """(B, L, H, D); ``smallest`` bounds L, H and D from below."""
    return (rng.randint(1, 3), rng.randint(smallest, 7), rng.randint(smallest, 5),
            rng.randint(smallest, 6))


def _shapes(rng: random.Random) -> list[tuple[int, int, int, int]]:
    """Three shapes, the first with L, H, D >= 2: with one head, one feature per head or
    one position, interleaved heads or a missing transpose give the right tensor."""
    return [_shape(rng, smallest=2), _shape(rng), _shape(rng)]


def _dtype(rng: random.Random) -> torch.dtype:
    return rng.choice([torch.float32, torch.float64])


def split_heads(split_heads) -> None:
    """(B, L, H*D) -> (B, H, L, D): head h holds features h*D .. (h+1)*D of every position."""
    rng = random.Random(_core.random_seed())
    for B, L, H, D in _shapes(rng):
        x = torch.randn(B, L, H * D, dtype=_dtype(rng))
        with _core.forbid(helpers=["helpers.attention.split_heads"]):
            out = split_heads(x, H)
        expected = torch.stack(x.chunk(H, dim=-1), dim=1)  # (B, H, L, D)
        _core.expect_close(out, expected, f"split_heads on shape {(B, L, H * D)} with H={H}")
    try:
        split_heads(torch.zeros(1, 2, 7), 2)
    except ValueError:
        return
    raise _core.HiddenTestFailed("split_heads(x, 2) with 7 features should raise a ValueError")


def merge_heads(merge_heads) -> None:
    """(B, H, L, D) -> (B, L, H*D): heads concatenated along the features."""
    rng = random.Random(_core.random_seed())
    for B, L, H, D in _shapes(rng):
        x = torch.randn(B, H, L, D, dtype=_dtype(rng))
        with _core.forbid(helpers=["helpers.attention.merge_heads"]):
            out = merge_heads(x)
        expected = torch.cat(x.unbind(dim=1), dim=-1)  # (B, L, H*D)
        _core.expect_close(out, expected, f"merge_heads on shape {(B, H, L, D)}")


def _torch_mha(rng: random.Random, d_model: int, n_heads: int, bias: bool,
               dtype: torch.dtype) -> nn.MultiheadAttention:
    theirs = nn.MultiheadAttention(d_model, n_heads, bias=bias, batch_first=True).to(dtype)
    if bias:
        with torch.no_grad():
            theirs.in_proj_bias.normal_()
            theirs.out_proj.bias.normal_()
    return theirs


def _allowed(rng: random.Random, L: int, S: int) -> torch.Tensor:
    """(L, S) mask, True = attend: every query sees a key, and query 0 misses one, so that
    an answer ignoring the mask differs (needs S >= 2)."""
    allowed = torch.rand(L, S) < 0.6
    seen = rng.randrange(S)
    allowed[:, seen] = True  # every query sees at least one key
    allowed[0, (seen + rng.randrange(1, S)) % S] = False
    return allowed


def mha_forward(module_class) -> None:
    """The student's module, given ``nn.MultiheadAttention``'s weights, gives its outputs."""
    rng = random.Random(_core.random_seed())
    torch.manual_seed(rng.randrange(2**31))
    for _ in range(3):
        n_heads, head_dim = rng.randint(1, 4), rng.randint(1, 6)
        d_model, B = n_heads * head_dim, rng.randint(1, 3)
        # S >= 2: with one key the mask allows everything, and ignoring it goes unnoticed
        L, S = rng.randint(1, 6), rng.randint(2, 6)
        dtype = _dtype(rng)
        theirs = _torch_mha(rng, d_model, n_heads, True, dtype)
        ours = module_class(d_model, n_heads).to(dtype)
        with torch.no_grad():
            for proj, weight, bias in zip((ours.q_proj, ours.k_proj, ours.v_proj),
                                          theirs.in_proj_weight.chunk(3),
                                          theirs.in_proj_bias.chunk(3)):
                proj.weight.copy_(weight)
                proj.bias.copy_(bias)
            ours.out_proj.weight.copy_(theirs.out_proj.weight)
            ours.out_proj.bias.copy_(theirs.out_proj.bias)
        x = torch.randn(B, L, d_model, dtype=dtype)
        context = torch.randn(B, S, d_model, dtype=dtype)
        allowed = _allowed(rng, L, S)
        with _core.forbid(torch_functions=FORBIDDEN_MHA, helpers=FORBIDDEN_HELPERS):
            self_out = ours(x)
            cross_out = ours(x, context=context, mask=allowed)
        expected_self = theirs(x, x, x, need_weights=False)[0]
        expected_cross = theirs(x, context, context, attn_mask=~allowed, need_weights=False)[0]
        _core.expect_close(self_out, expected_self, f"self-attention, d_model={d_model}, "
                           f"n_heads={n_heads}, L={L}")
        _core.expect_close(cross_out, expected_cross, f"masked cross-attention, L={L}, S={S}")


def _other_width(rng: random.Random, d_model: int) -> int:
    """A key or value width in 1 .. 100 that differs from ``d_model``: equal widths give
    the count of a module without kdim, vdim."""
    width = rng.randint(1, 99)
    return width if width < d_model else width + 1


def param_count(mha_param_count) -> None:
    """The count equals ``sum(p.numel())`` of ``nn.MultiheadAttention`` of the same sizes."""
    rng = random.Random(_core.random_seed())
    # every combination of bias and widths, each time: a count that forgets the biases is
    # right without them, one that ignores kdim, vdim is right without those
    for bias, other_widths in ((True, False), (False, False), (True, True), (False, True)):
        n_heads = rng.randint(1, 8)
        d_model = n_heads * rng.randint(1, 64)
        widths = {"kdim": _other_width(rng, d_model),
                  "vdim": _other_width(rng, d_model)} if other_widths else {}
        with _core.forbid(helpers=FORBIDDEN_HELPERS + ["torch.nn.MultiheadAttention"]):
            count = mha_param_count(d_model, n_heads, bias=bias, **widths)
        module = nn.MultiheadAttention(d_model, n_heads, bias=bias, device="meta", **widths)
        expected = sum(p.numel() for p in module.parameters())
        if count != expected:
            raise _core.HiddenTestFailed(f"mha_param_count({d_model}, {n_heads}, bias={bias}, "
                                         f"{widths}) = {count}, expected {expected}")


def load_torch_mha(load_torch_mha) -> None:
    """After loading, the course's module reproduces ``nn.MultiheadAttention``."""
    attention = _core.fresh_import("helpers.attention")
    rng = random.Random(_core.random_seed())
    torch.manual_seed(rng.randrange(2**31))
    # one module with biases, each time: without them, an answer that skips them is right
    for bias in (True, rng.random() < 0.6, rng.random() < 0.6):
        n_heads, head_dim = rng.randint(1, 4), rng.randint(1, 6)
        d_model, dtype = n_heads * head_dim, _dtype(rng)
        theirs = _torch_mha(rng, d_model, n_heads, bias, dtype)
        ours = attention.MultiHeadAttention(d_model, n_heads, bias=bias).to(dtype)
        with _core.forbid(torch_functions=FORBIDDEN_MHA, helpers=FORBIDDEN_HELPERS):
            load_torch_mha(ours, theirs)
        B, L = rng.randint(1, 3), rng.randint(1, 6)
        x = torch.randn(B, L, d_model, dtype=dtype)
        with torch.no_grad():
            _core.expect_close(ours(x), theirs(x, x, x, need_weights=False)[0],
                               f"output after loading (d_model={d_model}, n_heads={n_heads}, "
                               f"bias={bias})")
