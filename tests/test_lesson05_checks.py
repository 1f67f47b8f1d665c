"""Lesson 05 (BERT, GPT, T5): the checks accept the notebook's solutions, reject the usual
mistakes and shortcuts, keep their verdicts when the student patches torch or helpers, and
the references agree with code nobody here wrote (PyTorch, Hugging Face)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import helpers.hidden
from helpers import tasks
from helpers.checks import CheckFailed
from helpers.checks import lesson05 as checks

from conftest import expect_hidden_failure

LESSON = "05"


IGNORE = tasks.IGNORE_INDEX


def hidden():
    return importlib.reload(helpers.hidden).lesson("05")


def hidden_fails(hidden_test, answer) -> None:
    """The hidden test fails (wrong, or a shortcut), naming the seed of its draw."""
    failure = expect_hidden_failure(lambda: hidden_test(answer))
    assert "seed" in str(failure), failure


def rejected(check, answer, hidden_test, words: str) -> None:
    """The visible check fails naming ``words``, and the hidden test fails too."""
    with pytest.raises(CheckFailed, match=words):
        check(answer)
    hidden_fails(hidden_test, answer)


# --- the solutions pass ------------------------------------------------------------------------


@pytest.mark.parametrize("name, check", [
    ("TransformerBlock", "transformer_block"), ("mask_tokens", "mlm_masking"),
    ("next_token_loss", "next_token_loss"), ("shift_right", "shift_right")])
def test_solutions_pass_visible_and_hidden(solution, name, check):
    getattr(checks, check)(solution[name])
    getattr(hidden(), check)(solution[name])


# --- transformer block ---------------------------------------------------------------------------


def _block_with(solution, forward):
    return type("WrongBlock", (solution["TransformerBlock"],), {"forward": forward})


@pytest.mark.parametrize("forward, words", [
    (lambda self, x, mask=None: self.mlp(self.norm2(self.attn(self.norm1(x), mask=mask))),
     "residual connections missing"),
    (lambda self, x, mask=None: (lambda h: self.norm2(h + self.mlp(h)))(
        self.norm1(x + self.attn(x, mask=mask))), "post-LN"),
    (lambda self, x, mask=None: (lambda h: h + self.mlp(self.norm2(h)))(
        x + self.attn(self.norm1(x), mask=mask)), "causal mask not applied"),
    (lambda self, x, mask=None: (lambda h: h + self.mlp(self.norm2(h)))(
        x + self.attn(self.norm1(x), mask=torch.ones(x.shape[1], x.shape[1], dtype=torch.bool)
                      .tril() if self.causal else None)), "mask argument ignored"),
])
def test_block_mistakes_are_named(solution, forward, words):
    rejected(checks.transformer_block, _block_with(solution, forward),
             hidden().transformer_block, words)


def test_block_without_the_default_width_is_rejected(solution):
    """A block whose d_ff has no default of 4 * d_model passes whenever d_ff is given."""
    class NoDefaultWidth(solution["TransformerBlock"]):
        def __init__(self, d_model, n_heads, d_ff=None, causal=False):
            super().__init__(d_model, n_heads, d_ff or 2 * d_model, causal)

    rejected(checks.transformer_block, NoDefaultWidth, hidden().transformer_block,
             r"d_ff = 4 \* d_model")


def test_block_causal_by_default_is_rejected(solution):
    class CausalByDefault(solution["TransformerBlock"]):
        def __init__(self, d_model, n_heads, d_ff=None, causal=True):
            super().__init__(d_model, n_heads, d_ff, causal)

    rejected(checks.transformer_block, CausalByDefault, hidden().transformer_block,
             "causal=False by default")


def test_block_with_other_parameter_names_is_rejected(solution):
    class Renamed(solution["TransformerBlock"]):
        def __init__(self, d_model, n_heads, d_ff=None, causal=False):
            super().__init__(d_model, n_heads, d_ff, causal)
            self.ln_1 = self.norm1
            del self.norm1

        def forward(self, x, mask=None):
            return x

    rejected(checks.transformer_block, Renamed, hidden().transformer_block, "norm1")


def test_block_calling_torch_encoder_layer_is_rejected():
    class TorchLayer(nn.Module):
        def __init__(self, d_model, n_heads, d_ff=None, causal=False):
            super().__init__()
            d_ff = 4 * d_model if d_ff is None else d_ff
            self.causal = causal
            self.layer = nn.TransformerEncoderLayer(d_model, n_heads, d_ff, dropout=0.0,
                                                    activation="gelu", batch_first=True,
                                                    norm_first=True)

        def forward(self, x, mask=None):
            return self.layer(x)

    with pytest.raises(CheckFailed, match="calls"):
        checks.transformer_block(TorchLayer)
    hidden_fails(hidden().transformer_block, TorchLayer)


def test_block_shortcut_is_rejected():
    from helpers.transformer import TransformerBlock as Reference

    class Shortcut(Reference):
        def __init__(self, d_model, n_heads, d_ff=None, causal=False):
            super().__init__(d_model, n_heads, d_ff, causal=causal)

    rejected(checks.transformer_block, Shortcut, hidden().transformer_block, "calls")


def test_block_matches_torch_transformer_encoder_layer(solution):
    """Oracle: PyTorch's pre-LN nn.TransformerEncoderLayer with the same weights."""
    torch.manual_seed(0)
    d, h, d_ff, B, L = 16, 4, 32, 2, 6
    for causal in (False, True):
        ours = solution["TransformerBlock"](d, h, d_ff=d_ff, causal=causal).eval()
        for p in ours.parameters():
            nn.init.normal_(p, std=0.3)
        layer = nn.TransformerEncoderLayer(d, h, d_ff, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True).eval()
        with torch.no_grad():
            layer.self_attn.in_proj_weight.copy_(torch.cat(
                [ours.attn.q_proj.weight, ours.attn.k_proj.weight, ours.attn.v_proj.weight]))
            layer.self_attn.in_proj_bias.copy_(torch.cat(
                [ours.attn.q_proj.bias, ours.attn.k_proj.bias, ours.attn.v_proj.bias]))
            layer.self_attn.out_proj.load_state_dict(ours.attn.out_proj.state_dict())
            layer.norm1.load_state_dict(ours.norm1.state_dict())
            layer.norm2.load_state_dict(ours.norm2.state_dict())
            layer.linear1.load_state_dict(ours.mlp[0].state_dict())
            layer.linear2.load_state_dict(ours.mlp[2].state_dict())
            x = torch.randn(B, L, d)
            blocked = ~torch.ones(L, L, dtype=torch.bool).tril() if causal else None
            expected = layer(x, src_mask=blocked)
            assert (ours(x) - expected).abs().max() < 1e-5


# --- MLM masking ---------------------------------------------------------------------------------


def _untracked(name: str):
    """A copy of a ``helpers.tasks`` reference that the shortcut tripwire does not know, so
    that wrong answers built on it fail for their mistake, not for the shortcut."""
    namespace: dict = {}
    exec(compile(Path(tasks.__file__).read_text(), "<copy of helpers.tasks>", "exec"), namespace)
    return namespace[name]


_mask = _untracked("mask_tokens")


def _all_masked(tokens, mask_id, vocab_size, p=0.15, generator=None, special_ids=()):
    chosen = (torch.rand(tokens.shape, generator=generator) < p) & ~torch.isin(
        tokens, torch.tensor(special_ids))
    return tokens.masked_fill(chosen, mask_id), torch.where(chosen, tokens, IGNORE)


def _specials_too(tokens, mask_id, vocab_size, p=0.15, generator=None, special_ids=()):
    return _mask(tokens, mask_id, vocab_size, p, generator, special_ids=())


def _labels_everywhere(tokens, mask_id, vocab_size, p=0.15, generator=None, special_ids=()):
    inputs, _ = _mask(tokens, mask_id, vocab_size, p, generator, special_ids)
    return inputs, tokens.clone()


def _labels_only_at_mask(tokens, mask_id, vocab_size, p=0.15, generator=None, special_ids=()):
    inputs, labels = _mask(tokens, mask_id, vocab_size, p, generator, special_ids)
    return inputs, labels.masked_fill(inputs != mask_id, IGNORE)


def _global_rng(tokens, mask_id, vocab_size, p=0.15, generator=None, special_ids=()):
    return _mask(tokens, mask_id, vocab_size, p, None, special_ids)


def _in_place(tokens, mask_id, vocab_size, p=0.15, generator=None, special_ids=()):
    inputs, labels = _mask(tokens, mask_id, vocab_size, p, generator, special_ids)
    tokens.copy_(inputs)
    return inputs, labels


def _fixed_rate(tokens, mask_id, vocab_size, p=0.15, generator=None, special_ids=()):
    return _mask(tokens, mask_id, vocab_size, 0.15, generator, special_ids)


def _float_random_ids(tokens, mask_id, vocab_size, p=0.15, generator=None, special_ids=()):
    """Random ids drawn in int64 whatever the tokens: inputs lose the dtype of tokens."""
    inputs, labels = _mask(tokens.long(), mask_id, vocab_size, p, generator, special_ids)
    return inputs, labels


def _two_dims_only(tokens, mask_id, vocab_size, p=0.15, generator=None, special_ids=()):
    """Sizes read from two dims by position: an IndexError on a sequence of shape (L,)."""
    size = (tokens.shape[0], tokens.shape[1])
    return _mask(tokens.reshape(size), mask_id, vocab_size, p, generator, special_ids)


def _shortcut(tokens, mask_id, vocab_size, p=0.15, generator=None, special_ids=()):
    import helpers.tasks
    return helpers.tasks.mask_tokens(tokens, mask_id, vocab_size, p, generator, special_ids)


@pytest.mark.parametrize("answer, words", [
    (_all_masked, "80/10/10"), (_specials_too, "special tokens"), (_labels_everywhere, "-100"),
    (_labels_only_at_mask, "needs its label"), (_global_rng, "generator"),
    (_in_place, "in place"), (_fixed_rate, "argument p"), (_shortcut, "calls"),
    (_float_random_ids, "dtype of tokens"), (_two_dims_only, "(?s)IndexError.*tokens is \\(")])
def test_masking_mistakes_are_named(answer, words):
    rejected(checks.mlm_masking, answer, hidden().mlm_masking, words)


# --- next-token loss -----------------------------------------------------------------------------


def _ce(logits, tokens):
    return -logits.log_softmax(-1).gather(-1, tokens[..., None]).mean()


@pytest.mark.parametrize("answer, words", [
    (lambda logits, tokens: _ce(logits, tokens), "not shifted"),
    (lambda logits, tokens: _ce(logits[:, 1:], tokens[:, :-1]), "wrong way"),
    (lambda logits, tokens: _ce(logits[:, :-1], tokens[:, 1:]) * tokens[:, 1:].numel(),
     "summed"),
    (lambda logits, tokens: F.cross_entropy(logits[:, :-1].flatten(0, 1),
                                            tokens[:, 1:].flatten()), "calls cross_entropy"),
])
def test_loss_mistakes_are_named(answer, words):
    rejected(checks.next_token_loss, answer, hidden().next_token_loss, words)


def test_loss_matches_torch_cross_entropy(solution):
    """Oracle: F.cross_entropy on the shifted logits and targets."""
    torch.manual_seed(1)
    logits, tokens = torch.randn(4, 7, 13), torch.randint(13, (4, 7))
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 13), tokens[:, 1:].reshape(-1))
    assert abs(float(solution["next_token_loss"](logits, tokens) - expected)) < 1e-6


# --- shift right ---------------------------------------------------------------------------------


def _keeps_ignore(labels, start_id, pad_id):
    return torch.cat([torch.full_like(labels[:, :1], start_id), labels[:, :-1]], dim=1)


def _shifted_left(labels, start_id, pad_id):
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], pad_id)], dim=1)
    return shifted.masked_fill(shifted == IGNORE, pad_id)


@pytest.mark.parametrize("answer, words", [
    (lambda labels, start_id, pad_id: labels.clone(), "equal the labels"),
    (_keeps_ignore, "-100"), (_shifted_left, "start token"),
    (lambda labels, start_id, pad_id: tasks.shift_right(labels, start_id, pad_id), "calls"),
])
def test_shift_mistakes_are_named(answer, words):
    rejected(checks.shift_right, answer, hidden().shift_right, words)


def test_shift_right_matches_hugging_face_t5(solution):
    """Oracle: T5's own _shift_right (Hugging Face), from a small random config."""
    import transformers  # part of the test extra: its absence fails the test, never skips it

    config = transformers.T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1,
                                   num_heads=2, decoder_start_token_id=3, pad_token_id=5)
    model = transformers.T5ForConditionalGeneration(config)
    labels = torch.tensor([[7, 8, 9, 1, IGNORE, IGNORE], [10, 11, 12, 13, 14, 1]])
    expected = model._shift_right(labels)
    assert torch.equal(solution["shift_right"](labels, 3, 5), expected)
    assert torch.equal(tasks.shift_right(labels, 3, 5), expected)


# --- verdicts do not move when the student patches torch or helpers ------------------------------


def test_verdicts_survive_patched_allclose_and_helpers(monkeypatch):
    import helpers.tasks
    import helpers.transformer

    monkeypatch.setattr(torch, "allclose", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.testing, "assert_close", lambda *args, **kwargs: None)
    monkeypatch.setattr(helpers.tasks, "shift_right", _keeps_ignore)
    monkeypatch.setattr(helpers.tasks, "mask_tokens", _all_masked)

    class Identity(nn.Module):
        def __init__(self, d_model, n_heads, d_ff=None, causal=False):
            super().__init__()

        def forward(self, x, mask=None):
            return x

    monkeypatch.setattr(helpers.transformer, "TransformerBlock", Identity)
    with pytest.raises(CheckFailed):
        checks.shift_right(_keeps_ignore)
    hidden_fails(hidden().shift_right, _keeps_ignore)
    with pytest.raises(CheckFailed):
        checks.mlm_masking(_all_masked)
    hidden_fails(hidden().mlm_masking, _all_masked)
    with pytest.raises(CheckFailed):
        checks.transformer_block(Identity)
    hidden_fails(hidden().transformer_block, Identity)


# --- the synthetic corpora ---------------------------------------------------------------------


def test_corpora_say_what_they_mean():
    g = torch.Generator().manual_seed(0)
    vocab = tasks.ToyVocab(10, ("copy", "reverse", "sort", "summarize"))
    tokens = tasks.palindromes(vocab, 4, 5, g)
    assert torch.equal(tokens[:, 1:-1], tokens[:, 1:-1].flip(1))
    inputs, targets = tasks.copy_sequences(vocab, 4, 5, g)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert torch.equal(targets[:, -5:], inputs[:, :5])
    input_ids, labels = tasks.text_to_text(vocab, 64, 1, 6, g)
    for source, target in zip(input_ids.tolist(), labels.tolist()):
        task = vocab.tasks[source[0] - vocab.task_id(vocab.tasks[0])]
        words = source[1:source.index(vocab.eos_id)]
        answer = {"copy": words, "reverse": words[::-1], "sort": sorted(words),
                  "summarize": list(dict.fromkeys(words))}[task]
        assert target[:len(answer) + 1] == answer + [vocab.eos_id]
        assert all(t == IGNORE for t in target[len(answer) + 1:])
    summaries = [source for source in input_ids.tolist()
                 if source[0] == vocab.task_id("summarize")]
    assert any(len(set(s[1:s.index(vocab.eos_id)])) < s.index(vocab.eos_id) - 1
               for s in summaries)  # some summaries are shorter than their input


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_masking_and_block_run_on_cuda(solution):
    tokens = torch.randint(5, 100, (8, 64), device="cuda")
    inputs, labels = solution["mask_tokens"](
        tokens, 3, 100, generator=torch.Generator("cuda").manual_seed(0), special_ids=(0, 1))
    assert inputs.device.type == labels.device.type == "cuda"
    block = solution["TransformerBlock"](16, 4, causal=True).cuda()
    assert block(torch.randn(2, 5, 16, device="cuda")).device.type == "cuda"
