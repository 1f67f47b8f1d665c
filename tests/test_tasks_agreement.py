"""The synthetic tasks added for lessons 03 and 05, checked by reading the sentences back as
words: the agreement grammar's slots, answers and antecedents, and the tagging labels of
broken palindromes."""

from __future__ import annotations

import pytest
import torch

from helpers.tasks import (AGREEMENT_LENGTH, IGNORE_INDEX, AgreementGrammar, ToyVocab,
                           agreement_task, broken_palindromes)

GRAMMAR = AgreementGrammar()
SINGULAR = {singular: (singular, pronoun) for singular, _, pronoun in GRAMMAR.NOUNS}
PLURAL = {plural: (singular, pronoun) for singular, plural, pronoun in GRAMMAR.NOUNS}


def _read(words: list[str]) -> dict:
    """Parse one sentence ``the [adj]* NOUN (PREP the [adj] NOUN)* <verb> ADJ . <pron> .``
    and return what its two slots must agree with."""
    nouns = [i for i, word in enumerate(words) if word in SINGULAR or word in PLURAL]
    verb, pronoun = words.index("<verb>"), words.index("<pron>")
    subject = nouns[0]
    plural = words[subject] in PLURAL
    gender = (PLURAL if plural else SINGULAR)[words[subject]][1]
    before_verb = [i for i in nouns if i < verb]
    assert words[0] == "the" and all(w in GRAMMAR.ADJECTIVES for w in words[1:subject])
    assert words[verb + 2:] == [".", "<pron>", "."] and words[verb + 1] in GRAMMAR.ADJECTIVES
    for noun in nouns[1:]:  # each later noun ends a phrase "PREP the [adj] NOUN"
        start = noun - 2 if words[noun - 1] == "the" else noun - 3
        assert words[start] in GRAMMAR.PREPOSITIONS and words[start + 1] == "the"
    return {"verb": verb, "pronoun": pronoun, "subject": subject,
            "verb_word": "are" if plural else "is",
            "pronoun_word": "they" if plural else gender,
            "attracted": (words[before_verb[-1]] in PLURAL) != plural}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agreement_slots_answers_and_antecedents(seed):
    batch = agreement_task(300, torch.Generator().manual_seed(seed))
    assert batch.inputs.shape == batch.targets.shape == batch.antecedent.shape == (
        300, AGREEMENT_LENGTH)
    phrases, attracted = set(), 0
    for inputs, targets, antecedent, flag in zip(*batch):
        length = int((inputs != GRAMMAR.pad_id).sum())
        assert bool((inputs[length:] == GRAMMAR.pad_id).all())  # padding at the end only
        words = [GRAMMAR.words[i] for i in inputs[:length].tolist()]
        expected = _read(words)
        scored = (targets != IGNORE_INDEX).nonzero()[:, 0].tolist()
        assert scored == [expected["verb"], expected["pronoun"]]
        assert GRAMMAR.words[int(targets[expected["verb"]])] == expected["verb_word"]
        assert GRAMMAR.words[int(targets[expected["pronoun"]])] == expected["pronoun_word"]
        assert (antecedent != IGNORE_INDEX).nonzero()[:, 0].tolist() == scored
        assert antecedent[scored].tolist() == [expected["subject"]] * 2
        assert bool(flag) == expected["attracted"]
        phrases.add(sum(word in GRAMMAR.PREPOSITIONS for word in words))
        attracted += expected["attracted"]
    assert phrases == {0, 1, 2}  # the distance to the subject varies
    assert 0.15 < attracted / 300 < 0.5  # attractors are common, not the rule


def test_agreement_task_is_reproducible_and_on_the_asked_device():
    first = agreement_task(8, torch.Generator().manual_seed(5), device="meta")
    assert all(t.device.type == "meta" for t in first)
    again, other = (agreement_task(8, torch.Generator().manual_seed(s)) for s in (5, 6))
    same = agreement_task(8, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(again, same))
    assert not torch.equal(again.inputs, other.inputs)


def test_broken_palindromes_tag_the_symbols_that_break_the_mirror():
    vocab = ToyVocab(8)
    tokens, labels = broken_palindromes(vocab, 400, 5, torch.Generator().manual_seed(0))
    broken = 0
    for row, tags in zip(tokens.tolist(), labels.tolist()):
        assert row[0] == vocab.cls_id and row[-1] == vocab.sep_id
        assert tags[0] == tags[-1] == IGNORE_INDEX
        symbols = row[1:-1]
        mismatched = [int(a != b) for a, b in zip(symbols, symbols[::-1])]
        assert tags[1:-1] == mismatched
        assert sum(mismatched) in (0, 2)  # one replaced symbol breaks one mirrored pair
        broken += sum(mismatched) == 2
    assert 150 < broken < 250  # about half the sequences
