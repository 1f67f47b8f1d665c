"""Hidden tests of lesson 03 (multi-head attention): fresh shapes, dtypes and seeds.

Oracles are PyTorch's own: ``torch.chunk`` for the head layout and ``nn.MultiheadAttention``
for the module, its parameter count and its weights; plain indexing, one sentence at a time,
for the attention between two positions. Answers that only call the reference
(``helpers.attention``) or PyTorch's fused MHA fail. Every failure names its seed.
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
    """(B, L, H*D) -> (B, H, L, D): head h holds features h*D .. (h+1)*D of every position;
    a ValueError that names both sizes when the features do not divide into the heads."""
    seed = _core.random_seed()
    with _core.reporting_seed(seed):
        rng = random.Random(seed)
        for B, L, H, D in _shapes(rng):
            x = torch.randn(B, L, H * D, dtype=_dtype(rng))
            with _core.forbid(helpers=["helpers.attention.split_heads"]):
                out = split_heads(x, H)
            expected = torch.stack(x.chunk(H, dim=-1), dim=1)  # (B, H, L, D)
            _core.expect_close(out, expected, f"split_heads on shape {(B, L, H * D)} with H={H}")
        H = rng.randint(2, 9)
        E = H * rng.randint(2, 9) + rng.randint(1, H - 1)  # not divisible by H
        try:
            split_heads(torch.zeros(1, 2, E), H)
        except ValueError as error:
            if str(E) not in str(error) or str(H) not in str(error):
                raise _core.HiddenTestFailed(f"the ValueError of split_heads(x, {H}) with {E} "
                                             f"features should name {E} and {H}: {error}")
            return
        raise _core.HiddenTestFailed(f"split_heads(x, {H}) with {E} features should raise a "
                                     "ValueError")


def merge_heads(merge_heads) -> None:
    """(B, H, L, D) -> (B, L, H*D): heads concatenated along the features."""
    seed = _core.random_seed()
    with _core.reporting_seed(seed):
        rng = random.Random(seed)
        for B, L, H, D in _shapes(rng):
            x = torch.randn(B, H, L, D, dtype=_dtype(rng))  # contiguous, as attention's output
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
    seed = _core.random_seed()
    with _core.reporting_seed(seed):
        rng = random.Random(seed)
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
    seed = _core.random_seed()
    with _core.reporting_seed(seed):
        rng = random.Random(seed)
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
    """After loading, the course's module reproduces ``nn.MultiheadAttention``, with and
    without biases."""
    attention = _core.fresh_import("helpers.attention")
    seed = _core.random_seed()
    with _core.reporting_seed(seed):
        rng = random.Random(seed)
        torch.manual_seed(rng.randrange(2**31))
        # with and without biases, each time: an answer that skips the biases is right
        # without them, one that always copies them fails only without them
        for bias in (True, False, rng.random() < 0.5):
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
                                   f"output after loading (d_model={d_model}, "
                                   f"n_heads={n_heads}, bias={bias})")


def attention_from_to(attention_from_to) -> None:
    """Per head, the mean weight from each sentence's query position to its key position,
    against plain indexing one sentence at a time."""
    seed = _core.random_seed()
    with _core.reporting_seed(seed):
        rng = random.Random(seed)
        generator = torch.Generator().manual_seed(seed)
        for smallest in (2, 1):
            # B >= 2 first: with one sentence, pairing every sentence with every position is
            # right; L >= 2, so that a swapped query and key differ
            B, H, L = rng.randint(smallest, 6), rng.randint(1, 5), rng.randint(2, 9)
            dtype = _dtype(rng)
            weights = torch.randn(B, H, L, L, generator=generator).softmax(dim=-1).to(dtype)
            queries = torch.randint(L, (B,), generator=generator)
            if B >= 2:  # two sentences with different positions, or every pair looks alike
                queries[1] = (queries[0] + 1) % L
            keys = (queries + torch.randint(1, L, (B,), generator=generator)) % L  # != queries
            out = attention_from_to(weights, queries, keys)
            if not isinstance(out, torch.Tensor) or out.dtype != dtype:
                raise _core.HiddenTestFailed(f"attention_from_to should return a {dtype} "
                                             f"tensor, got {getattr(out, 'dtype', type(out))}")
            expected = torch.zeros(H, dtype=torch.float64)
            for b in range(B):
                expected += weights[b, :, int(queries[b]), int(keys[b])].double() / B
            _core.expect_close(out, expected, f"attention_from_to with B={B}, H={H}, L={L}")
