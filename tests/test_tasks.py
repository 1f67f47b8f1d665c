"""The synthetic tasks of lessons 01-05 (helpers.tasks) against their definitions, written out
here position by position in plain Python (lists and loops, not the tensor code under test),
and the edge cases the lessons lean on: what is padded, what is ignored, what is never drawn,
which draws repeat with a seed."""

from __future__ import annotations

import pytest
import torch

from helpers import tasks
from helpers.tasks import IGNORE_INDEX, ToyVocab


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rows(tensor: torch.Tensor) -> list:
    return tensor.tolist()


# --- lesson 01: recall at a distance ----------------------------------------------------------

@pytest.mark.parametrize("distance", [1, 3, 11])
def test_recall_targets_are_the_token_seen_distance_steps_ago(distance):
    tokens, targets = tasks.recall_task(6, 12, 5, distance, seeded(distance))
    assert tokens.dtype == targets.dtype == torch.int64
    for seq, wanted in zip(rows(tokens), rows(targets)):
        assert wanted == [IGNORE_INDEX] * distance + seq[:12 - distance]
        assert all(0 <= token < 5 for token in seq)


def test_recall_task_repeats_with_a_seed_and_every_token_is_drawn():
    first = tasks.recall_task(64, 20, 8, 4, seeded(0))
    again = tasks.recall_task(64, 20, 8, 4, seeded(0))
    other = tasks.recall_task(64, 20, 8, 4, seeded(1))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    counts = torch.bincount(first[0].flatten(), minlength=8).float() / first[0].numel()
    assert float((counts - 1 / 8).abs().max()) < 0.03, counts  # uniform: chance is 1/vocab
    with pytest.raises(ValueError, match="distance"):
        tasks.recall_task(1, 5, 8, 0)


# --- lesson 03: the previous token and the first token ----------------------------------------

def test_previous_and_first_token_targets():
    tokens, targets = tasks.previous_and_first_token_task(5, 9, 7, seeded(2))
    assert tokens.shape == (5, 9) and targets.shape == (5, 9, 2)
    assert targets.dtype == torch.int64
    for seq, wanted in zip(rows(tokens), rows(targets)):
        assert [pair[0] for pair in wanted] == [IGNORE_INDEX] + seq[:-1]
        assert [pair[1] for pair in wanted] == [seq[0]] * 9
        assert all(0 <= token < 7 for token in seq)


# --- lesson 04: the toy translation -----------------------------------------------------------

VOCAB, MIN_LENGTH, MAX_LENGTH = 20, 3, 10


def translation(batch: int, seed: int):
    return tasks.toy_translation_task(batch, MIN_LENGTH, MAX_LENGTH, VOCAB, seeded(seed))


def swapped(i: int, length: int) -> int:
    """Where target word i comes from: neighbours 2k and 2k+1 trade places; the last word of
    a sentence of odd length has no partner and stays."""
    partner = i + 1 if i % 2 == 0 else i - 1
    return partner if partner < length else i


def test_translation_layout_padding_and_alignment():
    source, target, lengths, alignment = translation(64, 3)
    assert source.shape == target.shape == alignment.shape == (64, MAX_LENGTH)
    assert lengths.shape == (64,)
    assert {int(n) for n in lengths} == set(range(MIN_LENGTH, MAX_LENGTH + 1))
    for src, tgt, n, align in zip(rows(source), rows(target), rows(lengths), rows(alignment)):
        assert all(2 <= word < VOCAB for word in src[:n]), "words are never <pad> or <bos>"
        assert src[n:] == [tasks.TRANSLATION_PAD] * (MAX_LENGTH - n)
        assert align[:n] == [swapped(i, n) for i in range(n)]
        assert sorted(align[:n]) == list(range(n)), "each source word is translated once"
        assert tgt[n:] == align[n:] == [IGNORE_INDEX] * (MAX_LENGTH - n)
        assert all(2 <= word < VOCAB for word in tgt[:n])


def test_translation_is_one_fixed_dictionary_for_every_call():
    """Target word i is the translation of source word alignment[i], by a dictionary that
    is a one-to-one map of the words (so that it can be read back off the data, as lesson
    04 does), the same for every seed, and not the identity."""
    dictionary: dict[int, int] = {}
    for seed in (4, 5, 6):
        source, target, lengths, _ = translation(256, seed)
        for src, tgt, n in zip(rows(source), rows(target), rows(lengths)):
            for i in range(n):
                word = src[swapped(i, n)]
                assert dictionary.setdefault(word, tgt[i]) == tgt[i], f"{word} has two translations"
    assert sorted(dictionary) == list(range(2, VOCAB)), "some word was never drawn"
    assert sorted(dictionary.values()) == list(range(2, VOCAB)), "two words share a translation"
    assert sum(word != meaning for word, meaning in dictionary.items()) >= (VOCAB - 2) // 2


# --- lesson 05: the corpora of BERT, GPT and T5 -----------------------------------------------

def symbols(vocab: ToyVocab) -> range:
    return range(vocab.first_symbol, vocab.first_symbol + vocab.n_symbols)


def test_palindromes_are_cls_word_mirror_sep():
    vocab = ToyVocab(6, ("copy",))
    tokens = tasks.palindromes(vocab, 32, 4, seeded(7))
    assert tokens.shape == (32, 10)
    for seq in rows(tokens):
        word = seq[1:5]
        assert seq == [vocab.cls_id] + word + word[::-1] + [vocab.sep_id]
        assert all(token in symbols(vocab) for token in word), "a special or task id as content"
    assert {token for seq in rows(tokens) for token in seq[1:5]} == set(symbols(vocab))


def test_copy_sequences_are_word_sep_word_read_one_step_ahead():
    vocab = ToyVocab(5)
    inputs, targets = tasks.copy_sequences(vocab, 16, 4, seeded(8))
    assert inputs.shape == targets.shape == (16, 8)
    for given, wanted in zip(rows(inputs), rows(targets)):
        word = given[:4]
        assert all(token in symbols(vocab) for token in word)
        assert given == word + [vocab.sep_id] + word[:3]
        assert wanted == word[1:] + [vocab.sep_id] + word


def test_text_to_text_inputs_and_labels():
    """``task: w </s> <pad>...`` in, ``task(w) </s>`` then ignored out, for every task."""
    vocab = ToyVocab(7, ("copy", "reverse", "sort"))
    answer = {"copy": lambda w: w, "reverse": lambda w: w[::-1], "sort": sorted}
    input_ids, labels = tasks.text_to_text(vocab, 96, 1, 6, seeded(9))
    assert input_ids.shape == (96, 8) and labels.shape == (96, 7)
    task_of = {vocab.task_id(task): task for task in vocab.tasks}
    seen_tasks, seen_lengths = set(), set()
    for given, wanted in zip(rows(input_ids), rows(labels)):
        task = task_of[given[0]]
        n = given.index(vocab.eos_id) - 1
        word = given[1:n + 1]
        assert all(token in symbols(vocab) for token in word)
        assert given[n + 2:] == [vocab.pad_id] * (6 - n)
        assert wanted == answer[task](word) + [vocab.eos_id] + [IGNORE_INDEX] * (6 - n)
        seen_tasks.add(task)
        seen_lengths.add(n)
    assert seen_tasks == set(vocab.tasks) and seen_lengths == set(range(1, 7))


def test_vocab_and_text_to_text_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="unknown tasks"):
        ToyVocab(5, ("translate",))
    with pytest.raises(ValueError, match="needs a ToyVocab built with tasks"):
        tasks.text_to_text(ToyVocab(5), 2, 1, 3)
    vocab = ToyVocab(30, ("sort",))
    assert len(vocab) == 5 + 1 + 30 and vocab.words[vocab.first_symbol] == "s0"
    assert vocab.decode(torch.tensor([vocab.task_id("sort"), IGNORE_INDEX, vocab.eos_id])) \
        == "sort: _ </s>"


# --- shift_right: teacher forcing -------------------------------------------------------------

def shifted_by_hand(labels: list[list[int]], start: int, pad: int) -> list[list[int]]:
    return [[start] + [pad if x == IGNORE_INDEX else x for x in row[:-1]] for row in labels]


@pytest.mark.parametrize("labels", [
    [[7]],  # one step: only the start token, the label itself is never read
    [[7, 8, 9]],
    [[7, IGNORE_INDEX, 9, IGNORE_INDEX]],  # ignored in the middle reads as padding
    [[5, 6, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]],
    [[0, 3, 0]],  # a label equal to pad_id stays
])
def test_shift_right_edge_cases(labels):
    tensor = torch.tensor(labels)
    before = tensor.clone()
    out = tasks.shift_right(tensor, start_id=1, pad_id=0)
    assert out.dtype == tensor.dtype and out.shape == tensor.shape
    assert rows(out) == shifted_by_hand(labels, 1, 0)
    assert torch.equal(tensor, before), "shift_right changed its input"


# --- mask_tokens: BERT's 80/10/10 -------------------------------------------------------------

MASK, V = 3, 1000
SPECIALS = (0, 1, 2, MASK)


def corpus(n: int, seed: int, dtype=torch.int64) -> torch.Tensor:
    """Content ids in 4 .. V - 1, with specials sprinkled in (they must never be chosen)."""
    g = seeded(seed)
    tokens = torch.randint(4, V, (n,), generator=g)
    every_seventh = tokens[::7]
    every_seventh.copy_(torch.tensor(SPECIALS)[torch.randint(len(SPECIALS), every_seventh.shape,
                                                              generator=g)])
    return tokens.to(dtype)


def test_mask_tokens_p_zero_changes_nothing():
    tokens = corpus(2000, 10)
    inputs, labels = tasks.mask_tokens(tokens, MASK, V, p=0.0, generator=seeded(0),
                                       special_ids=SPECIALS)
    assert torch.equal(inputs, tokens) and bool((labels == IGNORE_INDEX).all())


def test_mask_tokens_p_one_chooses_every_content_token_and_no_special():
    tokens = corpus(4000, 11)
    inputs, labels = tasks.mask_tokens(tokens, MASK, V, p=1.0, generator=seeded(1),
                                       special_ids=SPECIALS)
    special = torch.isin(tokens, torch.tensor(SPECIALS))
    assert torch.equal(labels[~special], tokens[~special])
    assert bool((labels[special] == IGNORE_INDEX).all())
    assert torch.equal(inputs[special], tokens[special])


def test_mask_tokens_splits_chosen_tokens_80_10_10():
    """Of the chosen tokens, 80 % become <mask>, 10 % a uniform random id, 10 % stay;
    counted over 200 000 tokens (one standard deviation is about 0.001 of a share)."""
    tokens = torch.randint(4, V, (200_000,), generator=seeded(12))
    inputs, labels = tasks.mask_tokens(tokens, MASK, V, p=0.15, generator=seeded(2))
    chosen = labels != IGNORE_INDEX
    assert abs(float(chosen.float().mean()) - 0.15) < 0.005
    assert torch.equal(labels[chosen], tokens[chosen])
    assert torch.equal(inputs[~chosen], tokens[~chosen])
    picked, original = inputs[chosen], tokens[chosen]
    masked = float((picked == MASK).float().mean())
    kept = float((picked == original).float().mean())
    replaced = picked[(picked != MASK) & (picked != original)]
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01, (masked, kept)
    assert abs(len(replaced) / len(picked) - 0.1) < 0.01
    # the random ids span the whole vocabulary, specials included (BERT draws any id)
    assert int(replaced.min()) < 20 and int(replaced.max()) > V - 20


def test_mask_tokens_keeps_shape_and_dtype_and_repeats_with_a_seed():
    tokens = corpus(600, 13, torch.int32).view(2, 3, 100)
    first = tasks.mask_tokens(tokens, MASK, V, generator=seeded(3), special_ids=SPECIALS)
    again = tasks.mask_tokens(tokens, MASK, V, generator=seeded(3), special_ids=SPECIALS)
    other = tasks.mask_tokens(tokens, MASK, V, generator=seeded(4), special_ids=SPECIALS)
    inputs, labels = first
    assert inputs.shape == labels.shape == (2, 3, 100)
    assert inputs.dtype == torch.int32 and labels.dtype == torch.int64
    assert torch.equal(inputs, again[0]) and torch.equal(labels, again[1])
    assert not torch.equal(labels, other[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tasks_put_their_tensors_on_the_device_asked_for():
    device, generator = "cuda", seeded(5)
    produced = [*tasks.recall_task(2, 6, 5, 2, generator, device),
                *tasks.previous_and_first_token_task(2, 6, 5, generator, device),
                *tasks.toy_translation_task(2, 3, 6, 10, generator, device)]
    vocab = ToyVocab(5, ("reverse",))
    produced += [tasks.palindromes(vocab, 2, 3, generator, device),
                 *tasks.copy_sequences(vocab, 2, 3, generator, device),
                 *tasks.text_to_text(vocab, 2, 1, 4, generator, device)]
    assert all(t.device.type == device for t in produced)
