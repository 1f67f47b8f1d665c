"""Hidden tests of lesson 04 (self, causal and cross attention): fresh shapes and seeds.

Oracles are PyTorch's: ``causal_lower_right`` for the causal mask, ``nn.MultiheadAttention``
with ``key_padding_mask`` (``True`` = ignore) for padding and cross-attention, and
``torch.autograd.functional.jacobian`` for the leakage test. Answers that only call the
course's references fail. Every failure names its seed.
"""

from __future__ import annotations

import random

import torch
from torch import nn
from torch.autograd.functional import jacobian
from torch.nn.attention.bias import causal_lower_right

from helpers.hidden import _core

CAUSAL_SHORTCUTS = ["helpers.attention.causal_mask", "helpers.attention.sliding_window_mask",
                    "torch.nn.attention.bias.causal_lower_right"]


def _mask_sizes(rng: random.Random) -> list[tuple[int, int]]:
    """Four (L, S), the first with L < S: where L = S, top-left and bottom-right aligned
    masks are the same, and a top-left one would pass."""
    S = rng.randint(2, 9)
    sizes = [(rng.randint(1, S - 1), S)]
    for _ in range(3):
        S = rng.randint(1, 9)
        sizes.append((rng.choice([S, rng.randint(1, S)]), S))
    return sizes


def causal_mask(causal_mask) -> None:
    """Bottom-right aligned (L, S) boolean masks, for L = S and for L < S."""
    seed = _core.random_seed()
    with _core.reporting_seed(seed):
        rng = random.Random(seed)
        for L, S in _mask_sizes(rng):
            with _core.forbid(helpers=CAUSAL_SHORTCUTS):
                mask = causal_mask(L, S)
                square = causal_mask(S)
            for got, (rows, cols) in ((mask, (L, S)), (square, (S, S))):
                if not isinstance(got, torch.Tensor) or got.dtype != torch.bool:
                    raise _core.HiddenTestFailed(f"causal_mask({rows}, {cols}) should be a "
                                                 "bool tensor")
                expected = causal_lower_right(rows, cols)._materialize()
                if tuple(got.shape) != (rows, cols) or not bool((got == expected).all()):
                    raise _core.HiddenTestFailed(f"causal_mask({rows}, {cols}) is wrong")
        with _core.forbid(helpers=CAUSAL_SHORTCUTS):
            on_meta = causal_mask(L, S, device="meta")
        if not isinstance(on_meta, torch.Tensor) or on_meta.device.type != "meta":
            raise _core.HiddenTestFailed("causal_mask(L, S, device='meta') should be built on "
                                         "the meta device")


def _ignore_oracle(lengths: torch.Tensor, S: int) -> torch.Tensor:
    """(B, S) True on padding, built by ``pad_sequence`` rather than by comparison."""
    real = [torch.zeros(int(n), dtype=torch.bool) for n in lengths]
    padded = nn.utils.rnn.pad_sequence(real + [torch.zeros(S, dtype=torch.bool)],
                                       batch_first=True, padding_value=True)
    return padded[:-1]  # (B, S)


def _lengths(B: int, S: int, padded: bool) -> torch.Tensor:
    """(B,) random lengths in 1 .. S; if ``padded`` (needs S >= 2), the first is below S."""
    lengths = torch.randint(1, S + 1, (B,))
    if padded:
        lengths[0] = torch.randint(1, S, ())
    return lengths


def padding_mask(padding_mask) -> None:
    """(B, 1, 1, S), True on the real keys; attention with it equals PyTorch's with ~it."""
    seed = _core.random_seed()
    with _core.reporting_seed(seed):
        rng = random.Random(seed)
        torch.manual_seed(rng.randrange(2**31))
        for smallest in (2, 1, 1):
            # the first S >= 2 with a padded sequence: where no sequence is padded, an
            # off-by-one mask is right, and with S = 1 a (B, 1, S, 1) mask is too
            B, S = rng.randint(1, 5), rng.randint(smallest, 9)
            lengths = _lengths(B, S, padded=smallest > 1)
            with _core.forbid(helpers=["helpers.attention.padding_mask"]):
                mask = padding_mask(lengths, S)
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise _core.HiddenTestFailed("padding_mask should return a bool tensor")
            if tuple(mask.shape) != (B, 1, 1, S):
                raise _core.HiddenTestFailed(f"padding_mask has shape {tuple(mask.shape)}, "
                                             f"expected {(B, 1, 1, S)}")
            if not bool((mask[:, 0, 0] == ~_ignore_oracle(lengths, S)).all()):
                raise _core.HiddenTestFailed(f"padding_mask({lengths.tolist()}, {S}) is wrong")


def cross_attention(cross_attention) -> None:
    """Equal to ``nn.MultiheadAttention(x, context, context, key_padding_mask=...)``."""
    seed = _core.random_seed()
    with _core.reporting_seed(seed):
        attention = _core.fresh_import("helpers.attention")
        rng = random.Random(seed)
        torch.manual_seed(rng.randrange(2**31))
        for padded in (True, False, False):
            # the first with padding (S >= 2): without it, an answer that ignores the lengths
            # is right
            n_heads, head_dim = rng.randint(1, 4), rng.randint(1, 6)
            d_model, B = n_heads * head_dim, rng.randint(1, 4)
            L, S = rng.randint(1, 7), rng.randint(2 if padded else 1, 7)
            dtype = rng.choice([torch.float32, torch.float64])
            theirs = nn.MultiheadAttention(d_model, n_heads, batch_first=True).to(dtype)
            with torch.no_grad():
                theirs.in_proj_bias.normal_()
            attn = attention.MultiHeadAttention.from_torch(theirs)
            x = torch.randn(B, L, d_model, dtype=dtype)
            context = torch.randn(B, S, d_model, dtype=dtype)
            lengths = _lengths(B, S, padded) if padded or rng.random() < 0.7 else None
            with torch.no_grad(), _core.forbid(torch_functions=["multi_head_attention_forward"],
                                               helpers=["helpers.attention.MultiHeadAttention"]):
                out = cross_attention(attn, x, context, lengths)
            ignore = None if lengths is None else _ignore_oracle(lengths, S)
            with torch.no_grad():
                expected = theirs(x, context, context, key_padding_mask=ignore,
                                  need_weights=False)[0]
            _core.expect_close(out, expected, f"cross_attention with L={L}, S={S}, "
                               f"lengths={None if lengths is None else lengths.tolist()}")


class _Model(nn.Module):
    """Self-attention, causal or not, plus an optional leak from input ``leak_from``
    to output ``leak_to`` (a bug of the kind the leakage test is for)."""

    def __init__(self, d_model: int, causal: bool, leak: tuple[int, int] | None):
        super().__init__()
        self.proj = nn.Linear(d_model, d_model)
        self.causal, self.leak = causal, leak

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = x.shape[1]
        scores = x @ x.transpose(1, 2) / x.shape[-1] ** 0.5  # (B, L, L)
        if self.causal:
            future = torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        out = self.proj(scores.softmax(dim=-1) @ x)  # (B, L, D)
        if self.leak is not None:
            source, target = self.leak
            bump = torch.zeros_like(out)
            bump[:, target] = 1e-3 * x[:, source]
            out = out + bump
        return out


def gradient_dependence(gradient_dependence) -> None:
    """The (L, L) gradient norms match the jacobian's, on leaky and non-leaky models."""
    seed = _core.random_seed()
    with _core.reporting_seed(seed):
        rng = random.Random(seed)
        torch.manual_seed(rng.randrange(2**31))
        for causal, leaky in ((True, False), (False, False), (True, True)):
            B, L, D = rng.randint(1, 3), rng.randint(3, 7), rng.randint(2, 6)
            leak = (rng.randint(1, L - 1), 0) if leaky else None
            if leak is not None:
                # an input after the output it reaches
                leak = (leak[0], rng.randint(0, leak[0] - 1))
            model = _Model(D, causal, leak).double()
            x = torch.randn(B, L, D, dtype=torch.float64)
            got = gradient_dependence(model, x)
            if x.grad is not None or x.requires_grad:
                raise _core.HiddenTestFailed("gradient_dependence changed the caller's x (it "
                                             "now requires or holds a gradient)")
            per_position = jacobian(lambda inputs: model(inputs).sum(dim=(0, 2)),
                                    x)  # (L, B, L, D)
            expected = per_position.pow(2).sum(dim=(1, 3)).sqrt()  # (L, L)
            name = "leaky" if leaky else ("causal" if causal else "bidirectional")
            _core.expect_close(got, expected, f"gradient_dependence on a {name} model, L={L}",
                               atol=1e-8, rtol=1e-6)
            future = got.detach().to("cpu", torch.float64).triu(diagonal=1)
            if causal and not leaky and float(future.abs().max()) != 0.0:
                raise _core.HiddenTestFailed("a causal model shows a gradient from the future")
            if leaky and float(future[leak[1], leak[0]]) <= 0.0:
                raise _core.HiddenTestFailed(f"a leak from input {leak[0]} to output {leak[1]} "
                                             "was not measured")

