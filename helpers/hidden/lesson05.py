"""Hidden tests for lesson 05 (BERT, GPT, T5): fresh shapes and seeds, private references.

Loaded through ``helpers.hidden.lesson("05")``, so every ``helpers`` module imported here is
a private copy that the student's kernel cannot have patched. Every failure names its seed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from helpers import attention, tasks, transformer
from helpers.checks import lesson05 as visible
from helpers.hidden._core import (HiddenTestFailed, expect, expect_close, forbid, random_seed,
                                  reporting_seed)

IGNORE_INDEX = -100
BLOCK_SHORTCUTS = visible.BLOCK_SHORTCUTS


def transformer_block(block_class: type[torch.nn.Module]) -> None:
    """The student's block, given random weights, equals the reference block (float64),
    bidirectional and causal, with and without a padding mask, and built with the defaults
    (``d_ff = 4 * d_model``, not causal)."""
    seed = random_seed()
    with reporting_seed(seed):
        generator = torch.Generator().manual_seed(seed)

        def randint(low: int, high: int) -> int:
            return int(torch.randint(low, high + 1, (1,), generator=generator))

        for causal in (False, True):
            n_heads = randint(1, 4)
            d_model, d_ff = n_heads * randint(2, 6), randint(8, 40)
            B, L = randint(1, 3), randint(2, 9)
            with forbid(**BLOCK_SHORTCUTS):
                block = block_class(d_model, n_heads, d_ff=d_ff, causal=causal)
            ref = transformer.TransformerBlock(d_model, n_heads, d_ff=d_ff, causal=causal)
            weights = {name: torch.randn(value.shape, generator=generator, dtype=torch.float64)
                       * 0.5 for name, value in ref.state_dict().items()}
            block, ref = block.double().eval(), ref.double().eval()
            try:
                block.load_state_dict(weights)
            except RuntimeError as error:
                raise HiddenTestFailed(f"the block's parameters are not those of the reference "
                                       f"block (norm1, attn, norm2, mlp): {error}") from None
            ref.load_state_dict(weights)
            x = torch.randn(B, L, d_model, generator=generator, dtype=torch.float64)
            lengths = torch.randint(1, L + 1, (B,), generator=generator)
            lengths[0] = torch.randint(1, L, (1,), generator=generator)  # some padding to mask
            for mask in (None, attention.padding_mask(lengths, L)):
                with torch.no_grad(), forbid(**BLOCK_SHORTCUTS):
                    out = block(x, mask=mask)
                with torch.no_grad():
                    expected = ref(x, mask=mask)
                expect_close(out, expected, f"block(x) with causal={causal}, "
                             f"{'a padding mask' if mask is not None else 'no mask'}", atol=1e-8)
        with forbid(**BLOCK_SHORTCUTS):
            block = block_class(d_model, n_heads).double().eval()
        ref = transformer.TransformerBlock(d_model, n_heads).double().eval()  # the defaults
        try:
            block.load_state_dict(ref.state_dict())
        except RuntimeError as error:
            raise HiddenTestFailed(f"TransformerBlock({d_model}, {n_heads}) without d_ff does "
                                   f"not have the reference's sizes (d_ff = 4 * d_model = "
                                   f"{4 * d_model}): {error}") from None
        with torch.no_grad(), forbid(**BLOCK_SHORTCUTS):
            out = block(x)
        expect_close(out, ref(x), f"TransformerBlock({d_model}, {n_heads})(x), the defaults",
                     atol=1e-8)


def mlm_masking(mask_tokens: Callable) -> None:
    """80/10/10 statistics on a large fresh sample, special tokens untouched, -100 labels,
    reproducible from the generator, the argument left unchanged."""
    seed = random_seed()
    with reporting_seed(seed):
        generator = torch.Generator().manual_seed(seed)
        vocab_size = int(torch.randint(500, 5000, (1,), generator=generator))
        special_ids = tuple(torch.randperm(20, generator=generator)[:4].tolist())
        mask_id = special_ids[int(torch.randint(4, (1,), generator=generator))]
        # never the default 0.15: an answer that ignores the argument p would pass
        p = (0.25, 0.3, 0.4)[int(torch.randint(3, (1,), generator=generator))]
        tokens = visible.masking_sample(128, 256, vocab_size, special_ids, generator)
        before = tokens.clone()
        seeds = [int(torch.randint(2**31, (1,), generator=generator)) for _ in range(2)]

        def draw(draw_seed: int, given: torch.Tensor = tokens
                 ) -> tuple[torch.Tensor, torch.Tensor]:
            with forbid(helpers=["helpers.tasks.mask_tokens"]):
                result = mask_tokens(given, mask_id, vocab_size, p=p,
                                     generator=torch.Generator().manual_seed(draw_seed),
                                     special_ids=special_ids)
            expect(isinstance(result, tuple) and len(result) == 2
                    and all(isinstance(r, torch.Tensor) for r in result),
                    "mask_tokens should return two tensors (inputs, labels)")
            expect(result[0].shape == given.shape and result[1].shape == given.shape,
                    f"inputs and labels should have the shape of tokens {tuple(given.shape)}")
            expect(result[0].dtype == given.dtype and result[1].dtype == torch.int64,
                    f"inputs should have the dtype of tokens ({given.dtype}) and labels int64, "
                    f"got {result[0].dtype} and {result[1].dtype}")
            return result

        inputs, labels = draw(seeds[0])
        expect(bool((tokens == before).all()), "mask_tokens changed tokens in place")
        stats = visible.masking_statistics(tokens, inputs, labels, mask_id, special_ids)
        expect(stats["special_chosen"] == 0 and stats["special_changed"] == 0,
                "special tokens were chosen or changed")
        expect(stats["wrong_labels"] == 0,
                "labels at chosen positions are not the original tokens")
        expect(stats["changed_unlabelled"] == 0, "tokens changed where the label is -100")
        expect(abs(stats["chosen"] - p) < 0.015,
                f"{stats['chosen']:.3f} of ordinary tokens chosen, expected {p}")
        for name, share in (("masked", 0.8), ("random", 0.1), ("kept", 0.1)):
            expect(abs(stats[name] - share) < 0.04,
                    f"{stats[name]:.3f} of chosen tokens {name}, expected {share}")
        replaced = labels.ne(IGNORE_INDEX) & inputs.ne(tokens) & inputs.ne(mask_id)
        randoms = inputs[replaced]
        expect(bool((randoms >= 0).all() and (randoms < vocab_size).all())
                and randoms.unique().numel() > 0.2 * randoms.numel(),
                "random replacements are not spread over 0 .. vocab_size - 1")
        again = draw(seeds[0])
        expect(bool((again[0] == inputs).all() and (again[1] == labels).all()),
                "the same generator seed gave a different corruption")
        other = draw(seeds[1])
        expect(bool((other[1] != labels).any()), "two generator seeds gave the same corruption")
        draw(seeds[1], given=tokens[0].int())  # any shape, any integer dtype


def next_token_loss(loss_fn: Callable) -> None:
    """Value and gradient against next-token cross-entropy written in plain arithmetic."""
    seed = random_seed()
    with reporting_seed(seed):
        generator = torch.Generator().manual_seed(seed)
        for dtype in (torch.float32, torch.float64):
            B, L, V = (int(torch.randint(2, 12, (1,), generator=generator)) for _ in range(3))
            logits = (3 * torch.randn(B, L, V, generator=generator)).to(dtype).requires_grad_()
            tokens = torch.randint(V, (B, L), generator=generator)
            with forbid(torch_functions=["cross_entropy", "nll_loss"]):
                loss = loss_fn(logits, tokens)
            expect(isinstance(loss, torch.Tensor) and loss.dim() == 0,
                    "the loss should be a scalar tensor")
            z = logits.detach().double()[:, :-1]  # (B, L-1, V)
            top = z.max(dim=-1, keepdim=True).values
            log_probs = z - top - (z - top).exp().sum(dim=-1, keepdim=True).log()
            target = torch.nn.functional.one_hot(tokens[:, 1:], V).double()  # (B, L-1, V)
            expected = -(log_probs * target).sum() / (B * (L - 1))
            expect_close(loss, expected, f"loss ({dtype})", atol=1e-5)
            loss.backward()
            grad = torch.zeros(B, L, V, dtype=torch.float64)
            grad[:, :-1] = (log_probs.exp() - target) / (B * (L - 1))
            expect(logits.grad is not None,
                    "the loss is not differentiable with respect to logits")
            expect_close(logits.grad, grad, f"d loss / d logits ({dtype})", atol=1e-6)


def shift_right(shift_fn: Callable) -> None:
    """Decoder inputs for random padded labels and random start and pad ids."""
    seed = random_seed()
    with reporting_seed(seed):
        generator = torch.Generator().manual_seed(seed)
        B, T = (int(torch.randint(3, 10, (1,), generator=generator)) for _ in range(2))
        start_id, pad_id = (int(i) for i in torch.randperm(10, generator=generator)[:2])
        labels = torch.randint(10, 50, (B, T), generator=generator)
        lengths = torch.randint(1, T + 1, (B,), generator=generator)
        # a -100 that gets shifted in
        lengths[0] = torch.randint(1, T - 1, (1,), generator=generator)
        lengths[-1] = T
        labels = labels.masked_fill(torch.arange(T) >= lengths[:, None], IGNORE_INDEX)
        before = labels.clone()
        with forbid(helpers=["helpers.tasks.shift_right"]):
            out = shift_fn(labels, start_id, pad_id)
        expect(isinstance(out, torch.Tensor), "shift_right should return a tensor")
        expect(bool((labels == before).all()), "shift_right changed the labels in place")
        expected = tasks.shift_right(labels, start_id, pad_id)
        expect(out.shape == expected.shape and bool((out == expected).all()),
                f"decoder inputs {out.tolist()} differ from the expected {expected.tolist()}")

