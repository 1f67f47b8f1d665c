"""Visible checks of lesson 04 (self, causal and cross attention): each failure names the
likely mistake.

Oracles: PyTorch's ``causal_lower_right`` bias, ``nn.MultiheadAttention`` (whose
``key_padding_mask`` is ``True`` where a key is *ignored*) and ``torch.autograd.functional
.jacobian``. Each check forbids the shortcuts that the hidden test forbids.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.autograd.functional import jacobian
from torch.nn.attention.bias import causal_lower_right

from helpers import attention as ref
from helpers.checks import (CheckFailed, call, expect, expect_close, expect_shape, expect_tensor,
                            exercise, is_close, passed, without_shortcuts)

CAUSAL_SHORTCUTS = ["helpers.attention.causal_mask", "helpers.attention.sliding_window_mask",
                    "torch.nn.attention.bias.causal_lower_right"]
CROSS_SHORTCUTS = dict(torch_functions=["multi_head_attention_forward"],
                       helpers=["helpers.attention.MultiHeadAttention"])


@exercise
def causal_mask(causal_mask: Callable[..., torch.Tensor]) -> None:
    """``causal_mask(L, S=None, device=None)``: (L, S) bool, query i sees keys 0 .. S-L+i."""
    with without_shortcuts("causal_mask", helpers=CAUSAL_SHORTCUTS):
        square = expect_tensor(call(causal_mask, 4, name="causal_mask(4)"), "causal_mask(4)")
        decode = expect_tensor(call(causal_mask, 2, 5, name="causal_mask(2, 5)"),
                               "causal_mask(2, 5)")
        on_meta = call(causal_mask, 3, device="meta", name="causal_mask(3, device='meta')",
                       hint="pass device= to the tensor factories (torch.arange, torch.ones)")
    expect_shape(square, (4, 4), "causal_mask(4)", "S defaults to L")
    expect(square.dtype == torch.bool, f"the mask should be boolean, got {square.dtype}")
    expected = causal_lower_right(4, 4)._materialize()
    if torch.equal(square, ~expected):
        raise CheckFailed("mask is inverted: True must mean attend (query i sees keys j <= i)")
    if torch.equal(square, expected.T):
        raise CheckFailed("the mask is transposed: rows are queries, columns keys; query i "
                          "sees keys j <= i, the lower triangle")
    if torch.equal(square, expected & ~torch.eye(4, dtype=torch.bool)):
        raise CheckFailed("each query must see itself too: the diagonal is True")
    expect(torch.equal(square, expected), f"causal_mask(4) should be the lower triangle, got\n"
           f"{square.int()}")
    expect_shape(decode, (2, 5), "causal_mask(2, 5)", "L queries, S keys")
    expected = causal_lower_right(2, 5)._materialize()
    if torch.equal(decode, torch.ones(2, 5, dtype=torch.bool).tril()):
        raise CheckFailed("causal mask is top-left aligned but queries are the last L of S "
                          "positions: query i sees keys 0 .. S-L+i (use diagonal=S-L)")
    expect(torch.equal(decode, expected), f"causal_mask(2, 5) should be\n{expected.int()}\n"
           f"got\n{decode.int()}")
    expect(expect_tensor(on_meta, "causal_mask(3, device='meta')").device.type == "meta",
           "create the mask on `device` (pass device= to the tensor factory)")
    passed("causal_mask")


@exercise
def padding_mask(padding_mask: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
    """``padding_mask(lengths, S)``: (B, 1, 1, S) bool, True on the real (unpadded) keys."""
    lengths = torch.tensor([3, 1, 5])
    with without_shortcuts("padding_mask", helpers=["helpers.attention.padding_mask"]):
        mask = call(padding_mask, lengths, 5, name="padding_mask(lengths, 5)",
                    hint="lengths is (B,) = (3,): compare torch.arange(S) (S,) with "
                         "lengths[:, None] (B, 1), then add the two singleton axes")
    mask = expect_tensor(mask, "padding_mask(lengths, 5)")
    expect_shape(mask, (3, 1, 1, 5), "padding_mask(lengths, 5)",
                 "(B, 1, 1, S) broadcasts over heads and queries")
    expect(mask.dtype == torch.bool, f"the mask should be boolean, got {mask.dtype}")
    expected = ref.padding_mask(lengths, 5)
    if torch.equal(mask, ~expected):
        raise CheckFailed("mask is inverted: True must mean attend (the real tokens); "
                          "nn.MultiheadAttention's key_padding_mask is the opposite")
    if torch.equal(mask, torch.arange(5) <= lengths[:, None, None, None]):
        raise CheckFailed("off by one: a sequence of length n has keys 0 .. n-1")
    expect(torch.equal(mask, expected), f"padding_mask([3, 1, 5], 5) should be\n"
           f"{expected[:, 0, 0].int()}\ngot\n{mask[:, 0, 0].int()}")
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(8, 2, batch_first=True)
    ours = ref.MultiHeadAttention.from_torch(theirs)
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        expected_out = theirs(x, x, x, key_padding_mask=~mask[:, 0, 0], need_weights=False)[0]
        expect_close(ours(x, mask=mask), expected_out, "attention with your padding mask",
                     "it should equal nn.MultiheadAttention with key_padding_mask = ~mask")
    passed("padding_mask")


def _cross_oracle(theirs: nn.MultiheadAttention, x: torch.Tensor, context: torch.Tensor,
                  lengths: torch.Tensor | None) -> torch.Tensor:
    ignore = None if lengths is None else ~ref.padding_mask(lengths, context.shape[1])[:, 0, 0]
    with torch.no_grad():
        return theirs(x, context, context, key_padding_mask=ignore, need_weights=False)[0]


@exercise
def cross_attention(cross_attention: Callable[..., torch.Tensor]) -> None:
    """``cross_attention(attn, x, context, context_lengths=None)`` against PyTorch's module."""
    torch.manual_seed(0)
    d_model, n_heads, B, L, S = 12, 3, 3, 4, 6
    theirs = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
    attn = ref.MultiHeadAttention.from_torch(theirs)
    x, context = torch.randn(B, L, d_model), torch.randn(B, S, d_model)
    lengths = torch.tensor([6, 2, 4])
    hint = (f"x is (B, L, d) = {(B, L, d_model)} and context (B, S, d) = {(B, S, d_model)}: "
            f"q from attn.q_proj(x), k and v from context, each split into {n_heads} heads; "
            "the padding mask ref.padding_mask(context_lengths, S) is (B, 1, 1, S)")
    square = torch.randn(B, S, d_model)
    with torch.no_grad(), without_shortcuts(
            "cross_attention", **CROSS_SHORTCUTS,
            hint="calling attn(...) (or PyTorch's multi-head attention) is the shortcut this "
                 "exercise forbids: use attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj "
                 "and ref.scaled_dot_product_attention"):
        out = call(cross_attention, attn, x, context, name="cross_attention(attn, x, context)",
                   hint=hint)
        on_square = call(cross_attention, attn, square, context,
                         name="cross_attention(attn, x, context) with x as long as context",
                         hint=hint)
        masked = call(cross_attention, attn, x, context, lengths,
                      name="cross_attention(attn, x, context, context_lengths)", hint=hint)
    out = expect_tensor(out, "cross_attention(attn, x, context)")
    expect_shape(out, (B, L, d_model), "cross_attention(attn, x, context)",
                 "one output per query (x has L positions), of width d_model")
    with torch.no_grad():
        q = ref.split_heads(attn.q_proj(x), n_heads)  # (B, H, L, D)
        k = ref.split_heads(attn.k_proj(context), n_heads)  # (B, H, S, D)
        v = ref.split_heads(attn.v_proj(context), n_heads)  # (B, H, S, D)
        merged = ref.merge_heads(ref.scaled_dot_product_attention(q, k, v)[0])  # (B, L, d)
    if is_close(out, merged):
        raise CheckFailed("the output is the merged heads: apply attn.out_proj (W^O) after "
                          "merging")
    with torch.no_grad():
        from_x = _cross_oracle(theirs, square, square, None)  # what attending to x gives
        if is_close(on_square, from_x):
            raise CheckFailed("keys and values came from x: in cross-attention they come from "
                              "context, only the queries from x")
    expect_close(out, _cross_oracle(theirs, x, context, None), "cross_attention(attn, x, context)",
                 "queries from attn.q_proj(x), keys and values from attn.k_proj / attn.v_proj "
                 "of context, heads split, attention, heads merged, attn.out_proj")
    if is_close(masked, out):
        raise CheckFailed("context_lengths had no effect: padded context positions must be "
                          "masked out (a padding mask over the keys)")
    expect_close(masked, _cross_oracle(theirs, x, context, lengths),
                 "cross_attention(attn, x, context, context_lengths)",
                 "mask the keys j >= context_lengths[b], not the queries")
    passed("cross_attention")


class CausalSelfAttention(nn.Module):
    """A one-layer model that cannot look ahead (or can, with ``causal=False``)."""

    def __init__(self, d_model: int, n_heads: int, causal: bool = True):
        super().__init__()
        self.attention, self.causal = ref.MultiHeadAttention(d_model, n_heads), causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = x.shape[1]
        mask = ref.causal_mask(L, device=x.device) if self.causal else None
        return self.attention(x, mask=mask)


def dependence_oracle(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(L, L): norm over batch and features of d sum(out[:, i]) / d x[:, j], by jacobian."""
    per_position = jacobian(lambda inputs: model(inputs).sum(dim=(0, 2)), x)  # (L, B, L, D)
    return per_position.pow(2).sum(dim=(1, 3)).sqrt()  # (L, L)


def accumulated_oracle(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What one ``.backward()`` per row into one ``x.grad`` gives: row i is the norm of the
    gradients of rows 0 .. i added up (the typical mistake, for its message)."""
    per_position = jacobian(lambda inputs: model(inputs).sum(dim=(0, 2)), x)  # (L, B, L, D)
    return per_position.cumsum(dim=0).pow(2).sum(dim=(1, 3)).sqrt()  # (L, L)


@exercise
def gradient_dependence(gradient_dependence: Callable[[nn.Module, torch.Tensor], torch.Tensor]
                        ) -> None:
    """The (L, L) gradient norms on a causal and on a bidirectional model."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    causal = CausalSelfAttention(8, 2)
    hint = ("x is (B, L, d) = (2, 5, 8): for each output position i, differentiate "
            "model(x)[:, i].sum() with respect to a detached copy of x; the graph is used once "
            "per row, so pass retain_graph=True to torch.autograd.grad (or to .backward)")
    dependence = call(gradient_dependence, causal, x, name="gradient_dependence(model, x)",
                      hint=hint)
    dependence = expect_tensor(dependence, "gradient_dependence(model, x)")
    expect_shape(dependence, (5, 5), "gradient_dependence(model, x)",
                 "one row per output position i, one column per input position j")
    expected = dependence_oracle(causal, x)
    if is_close(dependence, expected.T):
        raise CheckFailed("the matrix is transposed: row i is output position i, column j "
                          "input position j")
    expect(x.grad is None and not x.requires_grad, "leave the caller's x alone (it now "
           "requires or holds a gradient): differentiate a detached copy "
           "(x.detach().requires_grad_())")
    if is_close(dependence, accumulated_oracle(causal, x)):
        raise CheckFailed("row i holds the gradients of rows 0 .. i added up: .backward() "
                          "adds to x.grad, it does not replace it; set x.grad = None before "
                          "each .backward() (or use torch.autograd.grad, which returns the "
                          "gradient instead of accumulating it)")
    if torch.equal(dependence, dependence[:1].expand_as(dependence)):
        raise CheckFailed("every row is the same, unlike the reference: you differentiated the "
                          "whole output at once; take the gradient of out[:, i].sum(), one "
                          "output position i at a time (retain_graph=True)")
    if is_close(dependence, expected.pow(2)):
        raise CheckFailed("you returned squared norms: take the square root (the L2 norm over "
                          "batch and features)")
    expect_close(dependence, expected, "gradient_dependence on a causal model",
                 "entry [i, j] is the norm of the gradient of out[:, i].sum() with respect "
                 "to x[:, j] (over batch and features)")
    future = dependence.triu(diagonal=1)
    expect(bool((future == 0).all()), "a causal model gave a gradient from a future input: "
           "take the gradient of one output position at a time")
    bidirectional = CausalSelfAttention(8, 2, causal=False)
    expect_close(call(gradient_dependence, bidirectional, x, name="gradient_dependence on a "
                      "bidirectional model", hint=hint), dependence_oracle(bidirectional, x),
                 "gradient_dependence on a bidirectional model")
    passed("gradient_dependence")
