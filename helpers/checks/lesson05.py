"""Visible checks for lesson 05 (BERT, GPT, T5): each failure names the likely mistake.

The references are private copies of ``helpers`` (:func:`helpers.hidden._core.fresh_import`),
so a notebook cell that replaced ``helpers.tasks.mask_tokens`` or ``torch.allclose`` cannot
change a verdict; comparisons use :func:`helpers.checks.is_close` (plain arithmetic).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from helpers.checks import (CheckFailed, call, exercise, expect, expect_close, expect_shape,
                            expect_tensor, is_close, passed, without_shortcuts)
from helpers.hidden._core import fresh_import

IGNORE_INDEX = -100
BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.q_proj.weight", "attn.k_proj.weight",
              "attn.v_proj.weight", "attn.out_proj.weight", "norm2.weight", "norm2.bias",
              "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias")
BLOCK_SHORTCUTS = dict(
    torch_functions=["multi_head_attention_forward", "_transformer_encoder_layer_fwd"],
    helpers=["helpers.transformer.TransformerBlock", "torch.nn.TransformerEncoderLayer",
             "torch.nn.TransformerDecoderLayer"])


def _run_without(what: str, run: Callable[[], object], torch_functions=(), helpers=(),
                 hint: str = "") -> object:
    """``run()``, failing the check when it uses a forbidden reference or raises inside the
    student's code (with ``hint``)."""
    with without_shortcuts(what, torch_functions=torch_functions, helpers=helpers):
        return call(run, name=what, hint=hint)


# --- transformer block -------------------------------------------------------------------


def _block_variants(ref: nn.Module, x: torch.Tensor, mask: torch.Tensor | None,
                    causal_mask: Callable) -> dict[str, torch.Tensor]:
    """The block computed with the usual mistakes, from the reference's own submodules."""
    L = x.shape[1]
    full = causal_mask(L, device=x.device) if ref.causal else None
    combined = full if mask is None else (mask if full is None else mask & full)

    def attn(h: torch.Tensor, m: torch.Tensor | None = combined) -> torch.Tensor:
        return ref.attn(h, mask=m)

    n1, n2, mlp = ref.norm1, ref.norm2, ref.mlp
    h = x + attn(n1(x))
    post = n1(x + attn(x))
    stream = n1(x) + attn(n1(x))
    variants = {
        "residual connection missing around attention": attn(n1(x)) + mlp(n2(attn(n1(x)))),
        "residual connection missing around the MLP": mlp(n2(h)),
        "residual connections missing": mlp(n2(attn(n1(x)))),
        "post-LN block (LayerNorm after the residual sum, as in the 2017 paper and BERT): "
        "this lesson's block is pre-LN, x + sublayer(LayerNorm(x))":
            n2(post + mlp(post)),
        "the residual stream itself is normalised (LayerNorm(x) + sublayer(LayerNorm(x))): "
        "only the sublayer's input is normalised, the skip path carries x unchanged":
            n2(stream) + mlp(n2(stream)),
        "norm1 and norm2 swapped": (x + attn(n2(x))) + mlp(n1(x + attn(n2(x)))),
    }
    if ref.causal:
        uncausal = x + attn(n1(x), mask)
        variants["causal mask not applied: position t sees the future"] = uncausal + mlp(
            n2(uncausal))
    if mask is not None:
        unmasked = x + attn(n1(x), full)
        variants["mask argument ignored: padding keys are attended to"] = unmasked + mlp(
            n2(unmasked))
    return variants


def _expect_default_width(block: nn.Module, d_model: int) -> None:
    """The block built without ``d_ff`` has the MLP width 4 * d_model."""
    first = getattr(getattr(block, "mlp", None), "0", None)
    width = getattr(getattr(first, "weight", None), "shape", None)
    expect(width is not None and tuple(width) == (4 * d_model, d_model),
           f"TransformerBlock({d_model}, n_heads) without d_ff should have d_ff = 4 * d_model = "
           f"{4 * d_model}: mlp[0].weight should be {(4 * d_model, d_model)}, got "
           f"{None if width is None else tuple(width)}; use d_ff = 4 * d_model when the "
           "argument d_ff is None")


@exercise
def transformer_block(block_class: type[nn.Module]) -> None:
    """The student's pre-LN block matches ``helpers.transformer.TransformerBlock``: with
    ``d_ff`` given, bidirectional and causal, with and without a padding mask; and with the
    defaults (``d_ff = 4 * d_model``, not causal)."""
    transformer = fresh_import("helpers.transformer")
    attention = fresh_import("helpers.attention")
    torch.manual_seed(0)
    d_model, n_heads, d_ff, B, L = 16, 4, 24, 2, 7
    hint = (f"x is (B, L, d_model) = {(B, L, d_model)} and the padding mask (B, 1, 1, L) = "
            f"{(B, 1, 1, L)}; self.attn(h, mask=mask) takes and returns (B, L, d_model)")
    x = torch.randn(B, L, d_model)
    for causal in (False, True):
        block = _run_without("TransformerBlock(...)", lambda: block_class(
            d_model, n_heads, d_ff=d_ff, causal=causal), **BLOCK_SHORTCUTS).eval()
        keys = tuple(block.state_dict())
        missing = [key for key in BLOCK_KEYS if key not in keys]
        expect(not missing, f"the block has no parameters named {missing}: keep the names "
               "norm1, attn (MultiHeadAttention), norm2 and mlp = nn.Sequential(Linear, GELU, "
               f"Linear); its parameters are {list(keys)}")
        ref = transformer.TransformerBlock(d_model, n_heads, d_ff=d_ff, causal=causal).eval()
        try:
            ref.load_state_dict(block.state_dict())
        except RuntimeError as error:
            raise CheckFailed(f"the block's parameters do not fit the reference: {error}; "
                              "check the sizes: mlp = Linear(d_model, d_ff), GELU, "
                              "Linear(d_ff, d_model), with d_ff = 4 * d_model only when the "
                              "argument d_ff is None") from None
        lengths = torch.tensor([L, L - 3])
        for mask in (None, attention.padding_mask(lengths, L)):
            with torch.no_grad():
                out = _run_without("TransformerBlock", lambda: block(x, mask=mask),
                                   **BLOCK_SHORTCUTS, hint=hint)
                expect_shape(out, (B, L, d_model), "block(x)",
                             "a block maps (B, L, d_model) to (B, L, d_model)")
                expected = ref(x, mask=mask)
                if is_close(out, expected):
                    continue
                for mistake, wrong in _block_variants(ref, x, mask, attention.causal_mask).items():
                    expect(not is_close(out, wrong), f"causal={causal}: {mistake}")
                expect_close(out, expected, f"block(x) with causal={causal}, "
                             f"mask={'padding' if mask is not None else 'None'}",
                             "compare with x + attn(norm1(x)) then h + mlp(norm2(h))")
    default = _run_without("TransformerBlock(d_model, n_heads)",
                           lambda: block_class(d_model, n_heads), **BLOCK_SHORTCUTS).eval()
    _expect_default_width(default, d_model)
    reference = transformer.TransformerBlock(d_model, n_heads).eval()
    reference.load_state_dict(default.state_dict())
    with torch.no_grad():
        out = _run_without("TransformerBlock(d_model, n_heads)(x)", lambda: default(x),
                           **BLOCK_SHORTCUTS, hint=hint)
        expect_close(out, reference(x), "TransformerBlock(d_model, n_heads)(x)",
                     "built without the argument causal, the block is bidirectional "
                     "(causal=False by default)")
    passed("transformer block")


# --- masked language modelling -------------------------------------------------------------


def masking_statistics(tokens: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor,
                       mask_id: int, special_ids: tuple[int, ...]) -> dict[str, float]:
    """What one MLM corruption did: the fraction of ordinary tokens chosen, and among the
    chosen the fractions masked, replaced at random and kept; plus counts of violations."""
    specials = torch.tensor(special_ids, dtype=tokens.dtype, device=tokens.device)
    ordinary = ~torch.isin(tokens, specials)
    chosen = labels != IGNORE_INDEX
    n_chosen = max(int(chosen.sum()), 1)
    masked = int((inputs[chosen] == mask_id).sum()) / n_chosen
    kept = int((inputs[chosen] == tokens[chosen]).sum()) / n_chosen
    return {
        "chosen": int((chosen & ordinary).sum()) / max(int(ordinary.sum()), 1),
        "masked": masked,
        "kept": kept,
        "random": 1.0 - masked - kept,
        "special_chosen": int((chosen & ~ordinary).sum()),
        "special_changed": int((inputs[~ordinary] != tokens[~ordinary]).sum()),
        "wrong_labels": int((labels[chosen] != tokens[chosen]).sum()),
        "changed_unlabelled": int((inputs[~chosen] != tokens[~chosen]).sum()),
    }


def masking_sample(batch: int, length: int, vocab_size: int, special_ids: tuple[int, ...],
                   generator: torch.Generator) -> torch.Tensor:
    """Token ids (batch, length): content ids above every special id, a special token
    first and padding (``special_ids[0]``) after a random length, like a real padded batch."""
    first = max(special_ids) + 1
    content = torch.randint(first, vocab_size, (batch, length), generator=generator)  # (B, L)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)  # (B,)
    tokens = content.masked_fill(torch.arange(length) >= lengths[:, None], special_ids[0])
    tokens[:, 0] = special_ids[-1]
    return tokens


def _expect_dtypes(inputs: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> None:
    expect(inputs.dtype == dtype, f"inputs should keep the dtype of tokens ({dtype}), got "
           f"{inputs.dtype}: give the random ids dtype=tokens.dtype (or .to(tokens.dtype))")
    expect(labels.dtype == torch.int64, f"labels should be int64 (what cross_entropy takes), "
           f"got {labels.dtype}: use tokens.long() for them")


@exercise
def mlm_masking(mask_tokens: Callable) -> None:
    """80/10/10 statistics, special tokens left alone, -100 labels, reproducible, no mutation."""
    vocab_size, mask_id, special_ids, p = 1000, 3, (0, 1, 2, 3), 0.15
    tokens = masking_sample(64, 512, vocab_size, special_ids, torch.Generator().manual_seed(0))
    before = tokens.clone()

    def draw(seed: int, rate: float = p, given: torch.Tensor = tokens
             ) -> tuple[torch.Tensor, torch.Tensor]:
        return _run_without("mask_tokens", lambda: mask_tokens(
            given, mask_id, vocab_size, p=rate, generator=torch.Generator().manual_seed(seed),
            special_ids=special_ids), helpers=["helpers.tasks.mask_tokens"],
            hint=f"tokens is {tuple(given.shape)}, {given.dtype}: draw random numbers of "
                 "tokens.shape, and build inputs and labels with torch.where")

    result = draw(1)
    expect(isinstance(result, tuple) and len(result) == 2,
           "mask_tokens should return a pair (inputs, labels)")
    inputs, labels = (expect_tensor(value, name) for value, name in zip(result, ("inputs",
                                                                                 "labels")))
    expect_shape(inputs, tokens.shape, "inputs", "inputs is tokens with some ids replaced, "
                 "same shape")
    expect_shape(labels, tokens.shape, "labels", "one label per token, -100 where not chosen")
    expect(not inputs.is_floating_point() and not labels.is_floating_point(),
           f"inputs ({inputs.dtype}) and labels ({labels.dtype}) should hold integer token "
           "ids: build them with torch.where from tokens, not from float random numbers")
    _expect_dtypes(inputs, labels, tokens.dtype)
    expect(bool((tokens == before).all()), "mask_tokens changed its argument `tokens` in "
           "place: work on a copy (e.g. torch.where or tokens.clone())")
    expect(int((labels == IGNORE_INDEX).sum()) > 0, "no label is -100: the loss must ignore "
           "the positions that were not chosen, else it trains the model to copy its input")
    stats = masking_statistics(tokens, inputs, labels, mask_id, special_ids)
    expect(stats["special_chosen"] == 0 and stats["special_changed"] == 0,
           "special tokens (padding, <cls>, <sep>, ...) were chosen or changed: choose only "
           "tokens whose id is not in special_ids")
    expect(stats["wrong_labels"] == 0, "a chosen position's label is not the original token: "
           "labels = the token before corruption, at chosen positions")
    if stats["changed_unlabelled"]:
        raise CheckFailed("a token was changed where the label is -100: every corrupted "
                          "position, the random replacements included, needs its label")
    expect(abs(stats["chosen"] - p) < 0.015, f"{stats['chosen']:.1%} of the ordinary tokens "
           f"were chosen, expected p = {p:.0%} (choose each ordinary token with probability p)")
    expect(stats["masked"] < 0.97, "every chosen token became <mask>: apply the 80/10/10 rule "
           "(80% <mask>, 10% a random token, 10% unchanged)")
    for name, share in (("masked", 0.8), ("random", 0.1), ("kept", 0.1)):
        expect(abs(stats[name] - share) < 0.04, f"{stats[name]:.1%} of the chosen tokens were "
               f"{name}, expected {share:.0%}: draw one uniform number per chosen token and "
               "split it 0.8 / 0.1 / 0.1")
    replaced = labels.ne(IGNORE_INDEX) & inputs.ne(tokens) & inputs.ne(mask_id)
    randoms = inputs[replaced]
    expect(bool((randoms >= 0).all() and (randoms < vocab_size).all()),
           "a random replacement is outside 0 .. vocab_size - 1")
    expect(randoms.unique().numel() > 0.2 * randoms.numel(), "the random replacements "
           "hardly vary: draw them uniformly from 0 .. vocab_size - 1")
    again = draw(1)
    expect(bool((again[0] == inputs).all() and (again[1] == labels).all()),
           "two calls with generators seeded alike gave different results: draw every "
           "random number with generator=generator")
    other = draw(2)
    expect(bool((other[1] != labels).any()), "two different seeds gave the same result: "
           "the randomness must come from the generator")
    rare = masking_statistics(tokens, *draw(3, rate=0.5), mask_id, special_ids)
    expect(abs(rare["chosen"] - 0.5) < 0.02, f"with p=0.5, {rare['chosen']:.1%} of the ordinary "
           "tokens were chosen: use the argument p, not a fixed 15%")
    one_sequence = tokens[0].int()  # (L,) int32: any shape, any integer dtype
    inputs, labels = draw(4, given=one_sequence)
    expect_shape(inputs, one_sequence.shape, "inputs for tokens of shape (L,)",
                 "tokens may have any shape: use tokens.shape, not its dims by position")
    expect_shape(labels, one_sequence.shape, "labels for tokens of shape (L,)")
    _expect_dtypes(inputs, labels, one_sequence.dtype)
    passed("MLM masking")


# --- next-token loss -------------------------------------------------------------------------


@exercise
def next_token_loss(loss_fn: Callable) -> None:
    """Mean cross-entropy of logits[:, t] against tokens[:, t + 1], written by hand."""
    torch.manual_seed(0)
    B, L, V = 3, 9, 11
    logits = torch.randn(B, L, V, requires_grad=True)
    tokens = torch.randint(V, (B, L))
    loss = _run_without("next_token_loss", lambda: loss_fn(logits, tokens),
                        torch_functions=["cross_entropy", "nll_loss"],
                        hint=f"logits is (B, L, V) = {(B, L, V)}, tokens (B, L) = {(B, L)}: "
                             "logits[:, :-1] predict tokens[:, 1:]; gather along the last dim "
                             "needs an index of shape (B, L - 1, 1)")
    expect_tensor(loss, "loss")
    expect(loss.dim() == 0, f"the loss should be a scalar (shape ()), got {tuple(loss.shape)}: "
           "average over every batch element and position")

    def ce(z: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(z.reshape(-1, V), y.reshape(-1), reduction=reduction)

    expected = ce(logits[:, :-1], tokens[:, 1:])
    if not is_close(loss, expected):
        mistakes = {
            "targets not shifted: the model is asked to predict the token it sees":
                ce(logits, tokens),
            "shifted the wrong way: logits[:, t] should be scored against tokens[:, t + 1], "
            "the next token, not the previous one": ce(logits[:, 1:], tokens[:, :-1]),
            "summed instead of averaged over the B * (L - 1) predictions":
                ce(logits[:, :-1], tokens[:, 1:], "sum"),
            "divided by B * L: there are only B * (L - 1) predictions, the last position "
            "has no next token": ce(logits[:, :-1], tokens[:, 1:], "sum") / (B * L),
            "the sign is wrong: cross-entropy is minus the log-probability of the target":
                -expected,
            "log of the logits, not of the softmax probabilities: take log_softmax first":
                -logits[:, :-1].gather(-1, tokens[:, 1:, None]).mean(),
        }
        for mistake, wrong in mistakes.items():
            expect(not is_close(loss, wrong), mistake)
        expect_close(loss, expected, "loss", "mean over positions of -log softmax(logits)[next "
                     "token]")
    loss.backward()
    expect(logits.grad is not None and bool(logits.grad[:, -1].eq(0).all()),
           "the last position's logits got a gradient: it has no next token to predict")
    passed("next-token loss")


# --- text-to-text decoder inputs --------------------------------------------------------------


@exercise
def shift_right(shift_fn: Callable) -> None:
    """Decoder inputs: start token, then the labels without the last; -100 becomes padding."""
    tasks = fresh_import("helpers.tasks")
    labels = torch.tensor([[7, 8, 9, 4, IGNORE_INDEX, IGNORE_INDEX], [5, 6, 7, 8, 9, 4]])
    start_id, pad_id = 1, 0
    before = labels.clone()
    out = _run_without("shift_right", lambda: shift_fn(labels, start_id, pad_id),
                       helpers=["helpers.tasks.shift_right"],
                       hint=f"labels is (B, T) = {tuple(labels.shape)}: a (B, 1) column of "
                            "start_id, then labels[:, :-1], concatenated along dim 1")
    expect_shape(out, labels.shape, "decoder_input_ids",
                 "as long as the labels: drop the last label to make room for the start token")
    expect(bool((labels == before).all()), "shift_right changed the labels in place: the loss "
           "still needs them; work on a copy")
    expected = tasks.shift_right(labels, start_id, pad_id)
    if bool((out == expected).all()):
        passed("shift right")
        return
    expect(not bool((out == labels).all()), "decoder inputs equal the labels: the decoder "
           "would see the very token it must predict; shift them right by one")
    expect(bool((out[:, 0] == start_id).all()), "every decoder input must start with the "
           f"start token (start_id={start_id}): nothing has been generated yet")
    expect(not bool((out == IGNORE_INDEX).any()), "-100 (ignored label) left in the decoder "
           "inputs: it is not a token id; replace it with pad_id")
    expect(bool((out[:, 1:] == expected[:, 1:]).all()), "after the start token come the labels "
           "0 .. T-2, in order (labels[:, :-1]), padded where the label is -100")
    passed("shift right")
