"""Visible checks of lesson 03 (multi-head attention): each failure names the likely mistake.

References: the course's :mod:`helpers.attention` and PyTorch's ``nn.MultiheadAttention``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from helpers import attention as ref
from helpers.checks import (CheckFailed, expect, expect_close, expect_shape, exercise, is_close,
                            passed)


def _counting(B: int, L: int, H: int, D: int) -> torch.Tensor:
    """(B, L, H*D) with every entry distinct, so any mix-up of axes shows."""
    return torch.arange(B * L * H * D, dtype=torch.float32).view(B, L, H * D)


@exercise
def split_heads(split_heads: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
    """``split_heads(x, n_heads)``: (B, L, H*D) -> (B, H, L, D), head h = features h*D..(h+1)*D."""
    B, L, H, D = 2, 3, 4, 5
    x = _counting(B, L, H, D)
    out = split_heads(x, H)
    expect_shape(out, (B, H, L, D), "split_heads(x, 4)",
                 "expected (B, H, L, D): heads come before positions")
    if torch.equal(out, x.view(B, L, D, H).permute(0, 3, 1, 2)):
        raise CheckFailed("heads are interleaved: head h must get the contiguous features "
                          "h*D .. (h+1)*D; reshape to (B, L, H, D) before transposing")
    if torch.equal(out, x.reshape(B, H, L, D)):
        raise CheckFailed("you reshaped (B, L, H*D) straight to (B, H, L, D), which mixes "
                          "positions and heads: view as (B, L, H, D), then transpose(1, 2)")
    expect_close(out, ref.split_heads(x, H), "split_heads(x, 4)",
                 "head h at position l should hold x[b, l, h*D:(h+1)*D]")
    try:
        split_heads(torch.zeros(1, 2, 10), 3)
    except ValueError:
        pass
    else:
        raise CheckFailed("split_heads(x, 3) with 10 features should raise a ValueError "
                          "that says 10 is not divisible by 3")
    passed("split_heads")


@exercise
def merge_heads(merge_heads: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """``merge_heads(x)``: (B, H, L, D) -> (B, L, H*D), the inverse of ``split_heads``."""
    B, L, H, D = 2, 3, 4, 5
    x = _counting(B, L, H, D)
    heads = ref.split_heads(x, H)  # (B, H, L, D)
    out = merge_heads(heads)
    expect_shape(out, (B, L, H * D), "merge_heads(x)", "expected (B, L, H*D)")
    if torch.equal(out, heads.reshape(B, L, H * D)):
        raise CheckFailed("you reshaped (B, H, L, D) straight to (B, L, H*D): transpose(1, 2) "
                          "back to (B, L, H, D) first, then reshape")
    expect_close(out, x, "merge_heads(split_heads(x))",
                 "merging must undo splitting: head h goes back to features h*D .. (h+1)*D")
    passed("merge_heads")


def _copy_weights(target: nn.Module, source: ref.MultiHeadAttention) -> None:
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            getattr(target, name).weight.copy_(getattr(source, name).weight)
            getattr(target, name).bias.copy_(getattr(source, name).bias)


@exercise
def mha_forward(module_class: type[nn.Module]) -> None:
    """The student's module against the reference, with the same weights."""
    torch.manual_seed(0)
    d_model, n_heads, B, L, S = 12, 3, 2, 4, 6
    reference = ref.MultiHeadAttention(d_model, n_heads)
    ours = module_class(d_model, n_heads)
    _copy_weights(ours, reference)
    x, context = torch.randn(B, L, d_model), torch.randn(B, S, d_model)
    out = ours(x)
    expect_shape(out, (B, L, d_model), "self-attention output", "expected (B, L, d_model)")
    q = ref.split_heads(reference.q_proj(x), n_heads)
    k = ref.split_heads(reference.k_proj(x), n_heads)
    v = ref.split_heads(reference.v_proj(x), n_heads)
    heads = ref.merge_heads(ref.scaled_dot_product_attention(q, k, v)[0])  # (B, L, d_model)
    if is_close(out, heads):
        raise CheckFailed("the output is the merged heads: apply out_proj (W^O) after merging")
    expect_close(out, reference(x), "self-attention output",
                 "project q, k, v, split into heads, attend, merge, then out_proj")
    cross = ours(x, context=context)
    expect_shape(cross, (B, L, d_model), "ours(x, context)",
                 "queries come from x (length L), keys and values from context (length S)")
    expect_close(cross, reference(x, context=context), "ours(x, context)",
                 "keys and values must be projected from context, queries from x")
    mask = ref.causal_mask(L, S)
    expect_close(ours(x, context=context, mask=mask), reference(x, context=context, mask=mask),
                 "ours(x, context, mask)", "pass the mask on to the attention of every head")
    passed("MultiHeadAttention.forward")


@exercise
def param_count(mha_param_count: Callable[..., int]) -> None:
    """The count against ``sum(p.numel())`` of ``nn.MultiheadAttention``."""
    for d_model, n_heads, bias in [(64, 4, True), (64, 8, True), (48, 3, False)]:
        count = mha_param_count(d_model, n_heads, bias=bias)
        expect(isinstance(count, int), f"return a Python int, got {type(count).__name__}")
        torch_count = sum(p.numel() for p in nn.MultiheadAttention(d_model, n_heads,
                                                                   bias=bias).parameters())
        if count == 3 * d_model * d_model + (3 * d_model if bias else 0):
            raise CheckFailed("you counted q, k and v but not the output projection W^O")
        if bias and count == 4 * d_model * d_model:
            raise CheckFailed("with bias=True each of the 4 projections has d_model biases")
        if not bias and count == 4 * d_model * d_model + 4 * d_model:
            raise CheckFailed("with bias=False there are no bias vectors: count the 4 weight "
                              "matrices only")
        expect(count == torch_count, f"mha_param_count({d_model}, {n_heads}, bias={bias}) = "
               f"{count}, nn.MultiheadAttention has {torch_count} parameters")
    count = mha_param_count(32, 4, bias=True, kdim=16, vdim=8)
    torch_count = sum(p.numel() for p in nn.MultiheadAttention(32, 4, kdim=16, vdim=8)
                      .parameters())
    expect(count == torch_count, f"with kdim=16, vdim=8 you count {count}, nn.MultiheadAttention "
           f"has {torch_count}: W^K is (d_model, kdim), W^V is (d_model, vdim)")
    passed("mha_param_count")


@exercise
def load_torch_mha(load_torch_mha: Callable[[nn.Module, nn.MultiheadAttention], None]) -> None:
    """After loading, the reference module matches ``nn.MultiheadAttention`` output."""
    torch.manual_seed(0)
    d_model, n_heads, B, L = 16, 4, 2, 5
    theirs = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
    with torch.no_grad():
        theirs.in_proj_bias.normal_()
        theirs.out_proj.bias.normal_()
    ours = ref.MultiHeadAttention(d_model, n_heads)
    load_torch_mha(ours, theirs)
    w_q, w_k, w_v = theirs.in_proj_weight.chunk(3)
    if torch.equal(ours.q_proj.weight, w_q) and torch.equal(ours.k_proj.weight, w_v):
        raise CheckFailed("k and v are swapped: in_proj_weight stacks W^Q, W^K, W^V in that order")
    if torch.equal(ours.q_proj.weight, w_q.T):
        raise CheckFailed("q_proj.weight is transposed: both modules store weights as (out, in), "
                          "so copy the (d_model, d_model) blocks of in_proj_weight as they are")
    expect_close(ours.q_proj.weight, w_q, "q_proj.weight",
                 "in_proj_weight is (3*d_model, d_model): the first d_model rows are W^Q")
    expect_close(ours.k_proj.weight, w_k, "k_proj.weight", "rows d_model .. 2*d_model are W^K")
    expect_close(ours.v_proj.weight, w_v, "v_proj.weight", "the last d_model rows are W^V")
    expect_close(ours.out_proj.weight, theirs.out_proj.weight, "out_proj.weight",
                 "copy theirs.out_proj too")
    expect_close(ours.q_proj.bias, theirs.in_proj_bias[:d_model], "q_proj.bias",
                 "in_proj_bias holds the q, k, v biases stacked the same way")
    expect_close(ours.out_proj.bias, theirs.out_proj.bias, "out_proj.bias",
                 "copy theirs.out_proj.bias")
    x = torch.randn(B, L, d_model)
    expected, _ = theirs(x, x, x, need_weights=False)
    expect_close(ours(x), expected, "output after loading")
    no_bias = nn.MultiheadAttention(d_model, n_heads, bias=False, batch_first=True)
    ours = ref.MultiHeadAttention(d_model, n_heads, bias=False)
    load_torch_mha(ours, no_bias)
    expect_close(ours(x), no_bias(x, x, x, need_weights=False)[0], "output with bias=False",
                 "without biases, in_proj_bias is None: copy only the weights")
    passed("load_torch_mha")
