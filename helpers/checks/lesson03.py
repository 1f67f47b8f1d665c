"""Visible checks of lesson 03 (multi-head attention): each failure names the likely mistake.

References: the course's :mod:`helpers.attention` and PyTorch's ``nn.MultiheadAttention``.
Each check forbids the shortcuts that the hidden test forbids, on the kinds of input it uses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from helpers import attention as ref
from helpers.checks import (CheckFailed, call, expect, expect_close, expect_shape, expect_tensor,
                            exercise, is_close, passed, without_shortcuts)

MHA_SHORTCUTS = dict(torch_functions=["multi_head_attention_forward"],
                     helpers=["helpers.attention.MultiHeadAttention"])


def _counting(B: int, L: int, H: int, D: int) -> torch.Tensor:
    """(B, L, H*D) with every entry distinct, so any mix-up of axes shows."""
    return torch.arange(B * L * H * D, dtype=torch.float32).view(B, L, H * D)


@exercise
def split_heads(split_heads: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
    """``split_heads(x, n_heads)``: (B, L, H*D) -> (B, H, L, D), head h = features h*D..(h+1)*D;
    a ValueError naming both sizes when H*D is not divisible by n_heads."""
    B, L, H, D = 2, 3, 4, 5
    x = _counting(B, L, H, D)
    with without_shortcuts("split_heads", helpers=["helpers.attention.split_heads"]):
        out = call(split_heads, x, H, name="split_heads(x, 4)",
                   hint=f"x is (B, L, H*D) = {(B, L, H * D)}: view it as (B, L, H, D) = "
                        f"{(B, L, H, D)}, then transpose(1, 2)")
    expect_shape(expect_tensor(out, "split_heads(x, 4)"), (B, H, L, D), "split_heads(x, 4)",
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
        call(split_heads, torch.zeros(1, 2, 10), 3, name="split_heads(x, 3) with 10 features",
             hint="10 features do not split into 3 heads, and torch's reshape said so before "
                  "your code did: compare x.shape[-1] % n_heads with 0 first, and raise a "
                  "ValueError that names both sizes")
    except ValueError as error:
        expect("10" in str(error) and "3" in str(error), "the ValueError for 10 features and "
               f"n_heads=3 should name both sizes (10 and 3), it says: {error}")
    else:
        raise CheckFailed("split_heads(x, 3) with 10 features should raise a ValueError that "
                          "says 10 is not divisible by 3")
    passed("split_heads")


@exercise
def merge_heads(merge_heads: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """``merge_heads(x)``: (B, H, L, D) -> (B, L, H*D), the inverse of ``split_heads``, for a
    tensor laid out as (B, H, L, D) in memory (as attention's output is) and for a view."""
    B, L, H, D = 2, 3, 4, 5
    x = _counting(B, L, H, D)
    view = ref.split_heads(x, H)  # (B, H, L, D), a transposed view of x
    heads = view.contiguous()  # (B, H, L, D) in memory, like the output of attention
    hint = ("x is (B, H, L, D) in memory; after transpose(1, 2) it is not contiguous, so "
            ".view cannot flatten it: use .reshape (it copies when it must)")
    for name, given in (("merge_heads(x)", heads), ("merge_heads(split_heads(x))", view)):
        with without_shortcuts("merge_heads", helpers=["helpers.attention.merge_heads"]):
            out = call(merge_heads, given, name=name, hint=hint)
        expect_shape(expect_tensor(out, name), (B, L, H * D), name, "expected (B, L, H*D)")
        if torch.equal(out, given.reshape(B, L, H * D)):
            raise CheckFailed("you reshaped (B, H, L, D) straight to (B, L, H*D): "
                              "transpose(1, 2) back to (B, L, H, D) first, then reshape")
        expect_close(out, x, name,
                     "merging must undo splitting: head h goes back to features h*D .. (h+1)*D")
    passed("merge_heads")


def _copy_weights(target: nn.Module, source: ref.MultiHeadAttention) -> None:
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            getattr(target, name).weight.copy_(getattr(source, name).weight)
            getattr(target, name).bias.copy_(getattr(source, name).bias)


@exercise
def mha_forward(module_class: type[nn.Module]) -> None:
    """The student's module against the reference, with the same weights, in float32 and
    float64, without calling a ready-made multi-head attention."""
    torch.manual_seed(0)
    d_model, n_heads, B, L, S = 12, 3, 2, 4, 6
    reference = ref.MultiHeadAttention(d_model, n_heads)
    ours = module_class(d_model, n_heads)
    _copy_weights(ours, reference)
    x, context = torch.randn(B, L, d_model), torch.randn(B, S, d_model)
    mask = ref.causal_mask(L, S)
    hint = (f"x is (B, L, d_model) = {(B, L, d_model)}, context (B, S, d_model) = "
            f"{(B, S, d_model)}: q from x, k and v from context, each split into "
            f"{n_heads} heads with ref.split_heads")
    with without_shortcuts("MultiHeadAttention.forward", **MHA_SHORTCUTS,
                           hint="use the projections and ref.scaled_dot_product_attention"):
        out = call(ours, x, name="ours(x)", hint=hint)
        cross = call(ours, x, context=context, name="ours(x, context)", hint=hint)
        masked = call(ours, x, context=context, mask=mask, name="ours(x, context, mask)",
                      hint=hint)
    expect_shape(expect_tensor(out, "ours(x)"), (B, L, d_model), "self-attention output",
                 "expected (B, L, d_model)")
    q = ref.split_heads(reference.q_proj(x), n_heads)
    k = ref.split_heads(reference.k_proj(x), n_heads)
    v = ref.split_heads(reference.v_proj(x), n_heads)
    heads = ref.merge_heads(ref.scaled_dot_product_attention(q, k, v)[0])  # (B, L, d_model)
    if is_close(out, heads):
        raise CheckFailed("the output is the merged heads: apply out_proj (W^O) after merging")
    expect_close(out, reference(x), "self-attention output",
                 "project q, k, v, split into heads, attend, merge, then out_proj")
    expect_shape(expect_tensor(cross, "ours(x, context)"), (B, L, d_model), "ours(x, context)",
                 "queries come from x (length L), keys and values from context (length S)")
    expect_close(cross, reference(x, context=context), "ours(x, context)",
                 "keys and values must be projected from context, queries from x")
    expect_close(masked, reference(x, context=context, mask=mask), "ours(x, context, mask)",
                 "pass the mask on to the attention of every head")
    double = module_class(d_model, n_heads).double()
    _copy_weights(double, reference.double())
    with without_shortcuts("MultiHeadAttention.forward", **MHA_SHORTCUTS):
        out64 = call(double, x.double(), name="ours(x) in float64", hint=hint)
    expect(out64.dtype == torch.float64, f"in float64 the output is {out64.dtype}: create no "
           "tensor without dtype= inside forward")
    expect_close(out64, reference(x.double()), "self-attention output in float64")
    passed("MultiHeadAttention.forward")


@exercise
def param_count(mha_param_count: Callable[..., int]) -> None:
    """The count against ``sum(p.numel())`` of ``nn.MultiheadAttention``, from the formula."""
    shortcuts = dict(helpers=["helpers.attention.MultiHeadAttention",
                              "torch.nn.MultiheadAttention"])
    hint = "count from the formula, without building a module"
    for d_model, n_heads, bias in [(64, 4, True), (64, 8, True), (48, 3, False)]:
        with without_shortcuts("mha_param_count", **shortcuts, hint=hint):
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
    with without_shortcuts("mha_param_count", **shortcuts, hint=hint):
        count = mha_param_count(32, 4, bias=True, kdim=16, vdim=8)
    torch_count = sum(p.numel() for p in nn.MultiheadAttention(32, 4, kdim=16, vdim=8)
                      .parameters())
    expect(count == torch_count, f"with kdim=16, vdim=8 you count {count}, nn.MultiheadAttention "
           f"has {torch_count}: W^K maps kdim inputs to d_model outputs (kdim * d_model "
           "weights), W^V vdim inputs to d_model outputs")
    passed("mha_param_count")


@exercise
def load_torch_mha(load_torch_mha: Callable[[nn.Module, nn.MultiheadAttention], None]) -> None:
    """After loading, the reference module matches ``nn.MultiheadAttention`` output, with and
    without biases, and the loader copies the weights itself (no ``from_torch``)."""
    torch.manual_seed(0)
    d_model, n_heads, B, L = 16, 4, 2, 5
    theirs = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
    with torch.no_grad():
        theirs.in_proj_bias.normal_()
        theirs.out_proj.bias.normal_()
    ours = ref.MultiHeadAttention(d_model, n_heads)
    with without_shortcuts("load_torch_mha", **MHA_SHORTCUTS,
                           hint="copy the tensors yourself, do not call from_torch"):
        call(load_torch_mha, ours, theirs, name="load_torch_mha(ours, theirs)",
             hint="in_proj_weight is (3*d_model, d_model): .chunk(3) gives W^Q, W^K, W^V; "
                  "copy each into ours.q_proj.weight ... under torch.no_grad()")
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
    with without_shortcuts("load_torch_mha", **MHA_SHORTCUTS):
        call(load_torch_mha, ours, no_bias, name="load_torch_mha on a module with bias=False",
             hint="without biases theirs.in_proj_bias is None (and ours has no biases): copy "
                  "the biases only when theirs.in_proj_bias is not None")
    expect_close(ours(x), no_bias(x, x, x, need_weights=False)[0], "output with bias=False",
                 "without biases, in_proj_bias is None: copy only the weights")
    passed("load_torch_mha")


def _from_to_loop(weights: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor
                  ) -> torch.Tensor:
    """The mean over the batch of weights[b, :, queries[b], keys[b]], one sentence at a time."""
    return torch.stack([weights[b, :, int(q), int(k)] for b, (q, k) in
                        enumerate(zip(queries, keys))]).mean(dim=0)  # (H,)


@exercise
def attention_from_to(attention_from_to: Callable[..., torch.Tensor]) -> None:
    """``attention_from_to(weights, queries, keys)`` -> (H,): per head, the mean over the batch
    of the weight from sentence b's query position to its key position."""
    generator = torch.Generator().manual_seed(0)
    B, H, L = 5, 3, 7
    causal = ref.causal_mask(L)
    scores = torch.randn(B, H, L, L, generator=generator, dtype=torch.float64)
    weights = ref.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)  # (B, H, L, L)
    queries = torch.tensor([6, 4, 5, 3, 6])  # e.g. where each sentence's verb is
    keys = torch.tensor([1, 2, 0, 1, 3])  # and its subject
    hint = (f"weights is (B, H, L, S) = {(B, H, L, L)}, queries and keys are (B,) = {(B,)}: "
            "pick weights[b, :, queries[b], keys[b]] for every b at once, with "
            "torch.arange(B) as the batch index")
    result = call(attention_from_to, weights, queries, keys,
                  name="attention_from_to(weights, queries, keys)", hint=hint)
    result = expect_tensor(result, "attention_from_to(...)")
    expect(tuple(result.shape) != (B, H), "got one value per sentence and head (B, H): take "
           "the mean over the batch, one value per head")
    expected = _from_to_loop(weights, queries, keys)
    cross = weights[:, :, queries, keys]  # (B, H, B): sentence b read at every c's positions
    if tuple(result.shape) == (H,) and is_close(result, cross.mean(dim=(0, 2))):
        raise CheckFailed("you averaged weights[b, :, queries[c], keys[c]] over every pair of "
                          "sentences (b, c): weights[:, :, queries, keys] pairs every sentence "
                          "with every position; index the batch too, "
                          "weights[torch.arange(B), :, queries, keys]")
    expect_shape(result, (H,), "attention_from_to(...)", "one mean weight per head")
    expect(not is_close(result, _from_to_loop(weights, keys, queries)),
           "queries and keys are swapped: a row of the weights is a query, a column a key, "
           "weights[b, h, query, key]")
    expect(not is_close(result, expected * B), "summed over the batch: take the mean")
    expect_close(result, expected, "attention_from_to(...)",
                 "entry h is the mean over b of weights[b, h, queries[b], keys[b]]")
    expect(result.dtype == weights.dtype, f"the result is {result.dtype}, the weights "
           f"{weights.dtype}: keep the dtype of the weights")
    passed("attention_from_to")
