"""Synthetic tasks: small, seeded, generated on the fly, so nothing is ever downloaded.

Token ids are ``int64``; a target of :data:`IGNORE_INDEX` marks a position that is not
scored (the default ``ignore_index`` of ``torch.nn.functional.cross_entropy``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

IGNORE_INDEX = -100


def recall_task(batch: int, length: int, vocab_size: int, distance: int,
                generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Recall at a distance: at every step ``t``, output the token seen ``distance`` steps ago.

    To answer, a recurrent model must carry the last ``distance`` tokens in its fixed-size
    state. Returns ``tokens`` ``(batch, length)`` in ``0 .. vocab_size - 1`` and ``targets``
    ``(batch, length)``: ``tokens[:, t - distance]``, or :data:`IGNORE_INDEX` for the first
    ``distance`` steps, which have nothing to recall.
    """
    if not 1 <= distance < length:
        raise ValueError(f"distance should be in 1 .. length - 1 = {length - 1}, got {distance}")
    tokens = torch.randint(vocab_size, (batch, length), generator=generator)  # (B, L)
    targets = tokens.roll(distance, dims=1)  # (B, L): targets[:, t] = tokens[:, t - distance]
    targets[:, :distance] = IGNORE_INDEX
    return tokens.to(device), targets.to(device)


def previous_and_first_token_task(batch: int, length: int, vocab_size: int,
                                  generator: torch.Generator | None = None,
                                  device: torch.device | str | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two lookups at once (lesson 03): at every position name the previous token and the
    first token of the sequence.

    One softmax per query cannot read two positions cleanly, so a multi-head model learns
    to give the lookups to different heads (one head looks one step back, another looks at
    position 0). Returns ``tokens`` ``(batch, length)`` in ``0 .. vocab_size - 1`` and
    ``targets`` ``(batch, length, 2)``: ``[..., 0]`` is the previous token
    (:data:`IGNORE_INDEX` at position 0) and ``[..., 1]`` the first token.
    """
    tokens = torch.randint(vocab_size, (batch, length), generator=generator)  # (B, L)
    previous = torch.cat([torch.full((batch, 1), IGNORE_INDEX), tokens[:, :-1]], dim=1)  # (B, L)
    first = tokens[:, :1].expand(batch, length)  # (B, L)
    return tokens.to(device), torch.stack([previous, first], dim=-1).to(device)  # (B, L, 2)


TRANSLATION_PAD, TRANSLATION_BOS = 0, 1


def toy_translation_task(batch: int, min_length: int, max_length: int, vocab_size: int,
                         generator: torch.Generator | None = None,
                         device: torch.device | str | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A toy translation (lesson 04): a fixed word-for-word dictionary plus local reordering.

    Each source word ``w`` in ``2 .. vocab_size - 1`` becomes ``dictionary[w]`` (a fixed
    permutation, the same in every call), and each pair of neighbours is swapped (positions
    ``2k`` and ``2k+1``), like an adjective that moves after its noun. So target word ``i``
    comes from source word ``alignment[i]``, which a decoder must find by cross-attention
    (Bahdanau et al., 2015). Sentences have ``min_length .. max_length`` words and are
    padded with :data:`TRANSLATION_PAD` (id 0); id 1 (:data:`TRANSLATION_BOS`) starts the
    decoder's input. Returns ``source`` and ``target`` ``(batch, max_length)``, ``lengths``
    ``(batch,)`` and ``alignment`` ``(batch, max_length)`` (the source position of each
    target word); target and alignment are :data:`IGNORE_INDEX` on padding.
    """
    n_words = vocab_size - 2
    fixed = torch.Generator().manual_seed(4)  # the same dictionary in every call
    dictionary = torch.cat([torch.tensor([TRANSLATION_PAD, TRANSLATION_BOS]),
                            2 + torch.randperm(n_words, generator=fixed)])
    lengths = torch.randint(min_length, max_length + 1, (batch,), generator=generator)  # (B,)
    positions = torch.arange(max_length)  # (S,)
    is_word = positions[None, :] < lengths[:, None]  # (B, S)
    words = 2 + torch.randint(n_words, (batch, max_length), generator=generator)  # (B, S)
    source = torch.where(is_word, words, TRANSLATION_PAD)  # (B, S)
    partner = positions ^ 1  # (S,): 0<->1, 2<->3, ...
    alignment = torch.where(partner[None, :] < lengths[:, None], partner, positions)  # (B, S)
    target = dictionary[source.gather(1, alignment)]  # (B, S)
    target = torch.where(is_word, target, IGNORE_INDEX)  # (B, S)
    alignment = torch.where(is_word, alignment, IGNORE_INDEX)  # (B, S)
    return source.to(device), target.to(device), lengths.to(device), alignment.to(device)


class ToyVocab:
    """The vocabulary of the BERT, GPT and T5 lesson: special tokens, task words, symbols.

    Ids ``0 .. 4`` are the special tokens ``<pad> <cls> <sep> <mask> </s>``; then one id per
    task word (the text-to-text prefixes of T5, such as ``reverse:``); then ``n_symbols``
    content symbols, shown as ``a, b, c, ...``.
    """

    SPECIALS = ("<pad>", "<cls>", "<sep>", "<mask>", "</s>")
    pad_id, cls_id, sep_id, mask_id, eos_id = range(5)

    def __init__(self, n_symbols: int, tasks: tuple[str, ...] = ()):
        unknown = [task for task in tasks if task not in TEXT_TO_TEXT_TASKS]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}: choose from {sorted(TEXT_TO_TEXT_TASKS)}")
        self.n_symbols, self.tasks = n_symbols, tuple(tasks)
        self.first_symbol = len(self.SPECIALS) + len(self.tasks)
        self.words = list(self.SPECIALS) + [f"{task}:" for task in self.tasks] + [
            chr(ord("a") + i) if n_symbols <= 26 else f"s{i}" for i in range(n_symbols)]

    def __len__(self) -> int:
        return len(self.words)

    @property
    def special_ids(self) -> tuple[int, ...]:
        """The ids that are never content: MLM masking must leave them alone."""
        return tuple(range(len(self.SPECIALS)))

    def task_id(self, task: str) -> int:
        """The id of the prefix word ``task:``."""
        return len(self.SPECIALS) + self.tasks.index(task)

    def decode(self, ids: torch.Tensor) -> str:
        """One sequence of ids (L,) as words; :data:`IGNORE_INDEX` is shown as ``_``."""
        return " ".join("_" if i == IGNORE_INDEX else self.words[i] for i in ids.tolist())


def palindromes(vocab: ToyVocab, batch: int, half_len: int,
                generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """A masked-language-modelling corpus: ``<cls> w reversed(w) <sep>``, (batch, 2 * half_len + 2).

    Every symbol appears twice, mirrored, so a masked one can be read off its partner, which
    lies to the left or to the right: a task made for bidirectional attention.
    """
    first = vocab.first_symbol + torch.randint(vocab.n_symbols, (batch, half_len),
                                               generator=generator)  # (B, N)
    cls = torch.full((batch, 1), vocab.cls_id)  # (B, 1)
    sep = torch.full((batch, 1), vocab.sep_id)  # (B, 1)
    tokens = torch.cat([cls, first, first.flip(1), sep], dim=1)  # (B, 2N + 2)
    return tokens.to(device)


def copy_sequences(vocab: ToyVocab, batch: int, n_tokens: int,
                   generator: torch.Generator | None = None,
                   device: torch.device | str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A next-token corpus: ``w <sep> w`` with ``w`` random, split as a language model reads it.

    Returns ``inputs`` (batch, 2 * n_tokens) and ``targets`` (batch, 2 * n_tokens), the same
    sequence shifted by one: ``targets[:, t]`` is the token after ``inputs[:, t]``. The first
    ``n_tokens`` targets are random (no model can beat ``ln(n_symbols)`` on them); the rest
    are copies that a causal model can learn to predict exactly.
    """
    words = vocab.first_symbol + torch.randint(vocab.n_symbols, (batch, n_tokens),
                                               generator=generator)  # (B, N)
    sep = torch.full((batch, 1), vocab.sep_id)  # (B, 1)
    sequence = torch.cat([words, sep, words], dim=1)  # (B, 2N + 1)
    return sequence[:, :-1].to(device), sequence[:, 1:].to(device)


def _reverse(words: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) -> (B, N): the first ``lengths[b]`` symbols of row ``b`` in reverse order."""
    positions = torch.arange(words.shape[1])  # (N,)
    source = (lengths[:, None] - 1 - positions).clamp(min=0)  # (B, N)
    return words.gather(1, source), lengths


def _sort(words: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) -> (B, N): the first ``lengths[b]`` symbols of row ``b`` in ascending order."""
    beyond = torch.arange(words.shape[1]) >= lengths[:, None]  # (B, N)
    return words.masked_fill(beyond, torch.iinfo(words.dtype).max).sort(dim=1).values, lengths


def _summarize(words: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) -> (B, N) and the answer lengths (B,): each symbol of the first ``lengths[b]``
    once, in the order of its first appearance; a shorter text whose length depends on the
    whole input, as a summary's does."""
    N = words.shape[1]
    real = torch.arange(N) < lengths[:, None]  # (B, N)
    same = words[:, :, None] == words[:, None, :]  # (B, N, N): word j equals word k
    earlier = torch.ones(N, N, dtype=torch.bool).tril(-1)  # (N, N): k before j
    repeated = (same & earlier & real[:, None, :]).any(dim=-1)  # (B, N)
    first = real & ~repeated  # (B, N): the first appearances
    order = (~first).int().sort(dim=1, stable=True).indices  # (B, N): first appearances first
    return words.gather(1, order), first.sum(dim=1)


TEXT_TO_TEXT_TASKS = {  # name -> (words (B, N), lengths (B,)) -> (answers, answer lengths)
    "copy": lambda words, lengths: (words, lengths),
    "reverse": _reverse,
    "sort": _sort,
    "summarize": _summarize,
}


def text_to_text(vocab: ToyVocab, batch: int, min_len: int, max_len: int,
                 generator: torch.Generator | None = None,
                 device: torch.device | str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Several tasks as one text-to-text problem (Raffel et al., 2020, "Exploring the Limits
    of Transfer Learning with a Unified Text-to-Text Transformer").

    Each example draws a task from ``vocab.tasks`` and ``length`` symbols ``w``:
    ``input_ids`` (batch, max_len + 2) is ``task: w </s>`` then ``<pad>``; ``labels``
    (batch, max_len + 1) is ``task(w) </s>`` then :data:`IGNORE_INDEX`. ``copy``,
    ``reverse`` and ``sort`` answer as many symbols as they read, like a word-for-word
    translation; ``summarize`` keeps each symbol once, in order of first appearance, so its
    answer is shorter when a symbol repeats.
    """
    if not vocab.tasks:
        raise ValueError("text_to_text needs a ToyVocab built with tasks, e.g. ('reverse', 'sort')")
    task = torch.randint(len(vocab.tasks), (batch,), generator=generator)  # (B,)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=generator)  # (B,)
    words = vocab.first_symbol + torch.randint(vocab.n_symbols, (batch, max_len),
                                               generator=generator)  # (B, N)
    answers, answer_lengths = zip(*(TEXT_TO_TEXT_TASKS[name](words, lengths)
                                    for name in vocab.tasks))
    answers = torch.stack(answers)  # (T, B, N)
    answers = answers.gather(0, task[None, :, None].expand(1, batch, max_len))[0]  # (B, N)
    answer_lengths = torch.stack(answer_lengths).gather(0, task[None])[0]  # (B,)
    positions = torch.arange(max_len + 1)  # (N + 1,)
    is_word = positions < lengths[:, None]  # (B, N + 1)
    is_eos = positions == lengths[:, None]  # (B, N + 1)
    end = torch.full((batch, 1), vocab.pad_id)  # (B, 1)
    source = torch.cat([words, end], dim=1).where(is_word, vocab.pad_id)  # (B, N + 1)
    source = source.masked_fill(is_eos, vocab.eos_id)
    prefix = torch.tensor([vocab.task_id(name) for name in vocab.tasks])[task]  # (B,)
    input_ids = torch.cat([prefix[:, None], source], dim=1)  # (B, N + 2)
    is_answer = positions < answer_lengths[:, None]  # (B, N + 1)
    labels = torch.cat([answers, end], dim=1).where(is_answer, IGNORE_INDEX)  # (B, N + 1)
    labels = labels.masked_fill(positions == answer_lengths[:, None], vocab.eos_id)
    return input_ids.to(device), labels.to(device)


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: ``start_id`` then ``labels`` without its last token.

    labels (B, T) -> (B, T). The decoder reads the answer so far and predicts the next token,
    so its input at step ``t`` is the label at ``t - 1``; :data:`IGNORE_INDEX` labels become
    ``pad_id``. T5 starts with ``<pad>`` (Raffel et al., 2020; ``_shift_right`` in Hugging Face).
    """
    start = torch.full_like(labels[:, :1], start_id)  # (B, 1)
    shifted = torch.cat([start, labels[:, :-1]], dim=1)  # (B, T)
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_id)


def mask_tokens(tokens: torch.Tensor, mask_id: int, vocab_size: int, p: float = 0.15,
                generator: torch.Generator | None = None, special_ids: tuple[int, ...] = ()
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-language-model corruption (Devlin et al., 2019, "BERT: Pre-training of
    Deep Bidirectional Transformers for Language Understanding").

    Each token whose id is not in ``special_ids`` is chosen with probability ``p``. A chosen
    token becomes ``mask_id`` 80% of the time, a uniformly random id in ``0 .. vocab_size - 1``
    10% of the time, and stays itself 10% of the time, so the model cannot learn that only
    ``<mask>`` positions matter. tokens (...) -> ``inputs`` (...), same dtype, and ``labels``
    (...) int64: the original token where chosen, :data:`IGNORE_INDEX` elsewhere. The random
    draws come from ``generator`` (on its device), so one seed gives one corruption.
    """
    draw_on = generator.device if generator is not None else tokens.device
    specials = torch.tensor(special_ids, dtype=tokens.dtype, device=tokens.device)
    chosen = torch.rand(tokens.shape, generator=generator, device=draw_on).to(tokens.device) < p
    chosen &= ~torch.isin(tokens, specials)  # (...)
    action = torch.rand(tokens.shape, generator=generator, device=draw_on).to(tokens.device)
    random_ids = torch.randint(vocab_size, tokens.shape, generator=generator,
                               device=draw_on).to(tokens.device, tokens.dtype)
    inputs = torch.where(chosen & (action < 0.8), mask_id, tokens)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    labels = torch.where(chosen, tokens.long(), IGNORE_INDEX)
    return inputs, labels


def associative_recall_task(batch: int, n_pairs: int, vocab_size: int,
                            n_queries: int | None = None,
                            generator: torch.Generator | None = None,
                            device: torch.device | str | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-query associative recall, MQAR (Arora et al., 2023, "Zoology: Measuring and
    Improving Recall in Efficient Language Models").

    Each sequence lists ``n_pairs`` key-value pairs ``k_1 v_1 k_2 v_2 ...``, then asks
    ``n_queries`` of the keys again (all of them when ``None``), in random order; at each
    query the model must output the value that followed that key. Keys are ids
    ``0 .. vocab_size // 2 - 1`` (distinct within a sequence), values
    ``vocab_size // 2 .. vocab_size - 1``. Returns ``tokens`` and ``targets``
    ``(batch, 2 * n_pairs + n_queries)``: the value at each query, :data:`IGNORE_INDEX`
    elsewhere. The draws come from ``generator`` (on its device). Recalling every pair needs a memory that grows with ``n_pairs``: attention
    looks back at them all, a fixed-size state must squeeze them in.
    """
    n_keys = vocab_size // 2
    n_queries = n_pairs if n_queries is None else n_queries
    if not 1 <= n_pairs <= n_keys:
        raise ValueError(f"n_pairs should be in 1 .. vocab_size // 2 = {n_keys} (the keys of "
                         f"a sequence are distinct), got {n_pairs}")
    if not 1 <= n_queries <= n_pairs:
        raise ValueError(f"n_queries should be in 1 .. n_pairs = {n_pairs} (each query asks a "
                         f"different key), got {n_queries}")
    draw_on = generator.device if generator is not None else "cpu"
    keys = torch.rand(batch, n_keys, generator=generator, device=draw_on).argsort(dim=1)
    keys = keys[:, :n_pairs]  # (B, N): distinct keys in random order
    values = n_keys + torch.randint(vocab_size - n_keys, (batch, n_pairs), generator=generator,
                                    device=draw_on)  # (B, N)
    asked = torch.rand(batch, n_pairs, generator=generator, device=draw_on).argsort(dim=1)
    asked = asked[:, :n_queries]  # (B, Q): which pairs the queries ask for
    pairs = torch.stack([keys, values], dim=2).flatten(1)  # (B, 2N): k_1 v_1 k_2 v_2 ...
    tokens = torch.cat([pairs, keys.gather(1, asked)], dim=1)  # (B, 2N + Q)
    targets = torch.full_like(tokens, IGNORE_INDEX)
    targets[:, 2 * n_pairs:] = values.gather(1, asked)
    return tokens.to(device), targets.to(device)


SELECTIVE_COPY_BLANK, SELECTIVE_COPY_MARKER = 0, 1


def selective_copying_task(batch: int, length: int, n_data: int, vocab_size: int,
                           generator: torch.Generator | None = None,
                           device: torch.device | str | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective copying (Gu & Dao, 2023, "Mamba: Linear-Time Sequence Modeling with Selective
    State Spaces", section 3.1): remember the data tokens scattered among blanks, in order.

    The first ``length`` positions are blanks (:data:`SELECTIVE_COPY_BLANK`, id 0) except
    ``n_data`` data tokens in ``2 .. vocab_size - 1`` at random positions; then come
    ``n_data`` markers (:data:`SELECTIVE_COPY_MARKER`, id 1), at which the model must name the
    data tokens in their order. Where the data sit changes from sequence to sequence, so a
    model must decide from a token's content, not its position, whether to keep it. Returns
    ``tokens`` (batch, length + n_data) and ``targets`` (batch, length + n_data): the data
    tokens at the markers, :data:`IGNORE_INDEX` elsewhere.
    """
    if not 1 <= n_data <= length:
        raise ValueError(f"n_data should be in 1 .. length = {length}, got {n_data}")
    if vocab_size < 3:
        raise ValueError(f"vocab_size should be at least 3 (blank, marker, a data token), "
                         f"got {vocab_size}")
    where = torch.rand(batch, length, generator=generator).argsort(dim=1)[:, :n_data]
    where = where.sort(dim=1).values  # (B, n_data): positions of the data, in order
    data = 2 + torch.randint(vocab_size - 2, (batch, n_data), generator=generator)  # (B, n)
    tokens = torch.full((batch, length + n_data), SELECTIVE_COPY_BLANK)
    tokens.scatter_(1, where, data)
    tokens[:, length:] = SELECTIVE_COPY_MARKER
    targets = torch.full_like(tokens, IGNORE_INDEX)
    targets[:, length:] = data
    return tokens.to(device), targets.to(device)


class AgreementGrammar:
    """The words of a toy English with two agreements (lesson 03).

    ``the [adj]* NOUN (PREP the [adj] NOUN)* <verb> ADJ . <pron> .``: the verb slot must be
    filled with ``is`` or ``are``, agreeing in number with the subject (the first noun),
    however many prepositional phrases with other nouns ("attractors", Linzen et al., 2016,
    "Assessing the Ability of LSTMs to Learn Syntax-Sensitive Dependencies") stand between;
    the pronoun slot with ``he``, ``she``, ``it`` or ``they``, agreeing with the subject, its
    antecedent, in gender and number. Ids: ``<pad>``, the two slots, function words,
    adjectives, prepositions, nouns (singular then plural of each), then the answers.
    """

    SPECIALS = ("<pad>", "<verb>", "<pron>")
    pad_id, verb_id, pronoun_id = range(3)
    ADJECTIVES = ("old", "tall", "young", "small")
    PREPOSITIONS = ("near", "behind", "with")
    NOUNS = (("man", "men", "he"), ("king", "kings", "he"), ("boy", "boys", "he"),
             ("woman", "women", "she"), ("queen", "queens", "she"), ("girl", "girls", "she"),
             ("dog", "dogs", "it"), ("car", "cars", "it"), ("tree", "trees", "it"))
    VERBS = ("is", "are")
    PRONOUNS = ("he", "she", "it", "they")
    words = (SPECIALS + ("the", ".") + ADJECTIVES + PREPOSITIONS
             + tuple(form for noun in NOUNS for form in noun[:2]) + VERBS + PRONOUNS)
    the_id, stop_id = words.index("the"), words.index(".")
    first_adjective, first_preposition = words.index("old"), words.index("near")
    first_noun, first_verb = words.index("man"), words.index("is")
    first_pronoun = words.index("he")

    def __len__(self) -> int:
        return len(self.words)

    def decode(self, ids: torch.Tensor) -> str:
        """One sequence of ids (L,) as words, without the padding."""
        return " ".join(self.words[i] for i in ids.tolist() if i != self.pad_id)


class AgreementBatch(NamedTuple):
    """What :func:`agreement_task` returns; each field is described there."""

    inputs: torch.Tensor  # (B, L)
    targets: torch.Tensor  # (B, L)
    antecedent: torch.Tensor  # (B, L)
    attracted: torch.Tensor  # (B,)


# The longest sentence, one slot per word; _agreement_slots keeps some of them.
_AGREEMENT_SLOTS = ("the", "adj", "adj", "subject", "prep", "the", "adj", "noun", "prep", "the",
                    "adj", "noun", "<verb>", "adj", ".", "<pron>", ".")
AGREEMENT_LENGTH = len(_AGREEMENT_SLOTS)


def agreement_task(batch: int, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> AgreementBatch:
    """Sentences of :class:`AgreementGrammar` with their two agreement slots to fill.

    Each sentence draws 0 to 2 adjectives before its subject, 0 to 2 prepositional phrases
    after it (each noun of any number and gender, with or without an adjective) and a
    predicate adjective; sentences are padded at the end with ``<pad>``. Returns
    ``inputs`` (batch, :data:`AGREEMENT_LENGTH`) word ids, the slots as ``<verb>`` and
    ``<pron>``; ``targets`` (batch, L), the right word at the two slots (``is``/``are``, a
    pronoun) and :data:`IGNORE_INDEX` elsewhere; ``antecedent`` (batch, L), the position of
    the subject at the two slots (the word they agree with) and :data:`IGNORE_INDEX`
    elsewhere; ``attracted`` (batch,), True where the noun nearest before the verb differs
    from the subject in number, so that agreeing with the nearest noun is wrong.
    """
    g = AgreementGrammar
    n_nouns = len(g.NOUNS)

    def draw(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(high, (batch, *shape), generator=generator)

    n_adjectives, n_phrases = draw(3), draw(3)  # (B,), (B,)
    lemma, plural = draw(n_nouns, 3), draw(2, 3)  # (B, 3): the subject, then two attractors
    nouns = g.first_noun + 2 * lemma + plural  # (B, 3)
    adjectives = g.first_adjective + draw(len(g.ADJECTIVES), 5)  # (B, 5)
    prepositions = g.first_preposition + draw(len(g.PREPOSITIONS), 2)  # (B, 2)
    column = {name: torch.full((batch,), g.words.index(name)) for name in ("the", ".")}
    column.update({"<verb>": torch.full((batch,), g.verb_id),
                   "<pron>": torch.full((batch,), g.pronoun_id)})
    slots = torch.stack([  # (B, S): every slot filled, some of them dropped below
        column["the"], adjectives[:, 0], adjectives[:, 1], nouns[:, 0],
        prepositions[:, 0], column["the"], adjectives[:, 2], nouns[:, 1],
        prepositions[:, 1], column["the"], adjectives[:, 3], nouns[:, 2],
        column["<verb>"], adjectives[:, 4], column["."], column["<pron>"], column["."]], dim=1)
    keep = torch.ones_like(slots, dtype=torch.bool)  # (B, S)
    keep[:, 1], keep[:, 2] = n_adjectives >= 1, n_adjectives >= 2
    keep[:, 4:8] = (n_phrases >= 1)[:, None]
    keep[:, 8:12] = (n_phrases >= 2)[:, None]
    keep[:, 6] &= draw(2).bool()  # an adjective in a phrase, or not
    keep[:, 10] &= draw(2).bool()
    position = keep.long().cumsum(dim=1) - 1  # (B, S): where each kept slot lands
    position = position.masked_fill(~keep, AGREEMENT_LENGTH)  # dropped slots: a spare column
    inputs = torch.full((batch, AGREEMENT_LENGTH + 1), g.pad_id)
    inputs.scatter_(1, position, slots)
    inputs = inputs[:, :AGREEMENT_LENGTH]  # (B, L)

    verb = g.first_verb + plural[:, 0]  # (B,): is / are
    pronoun = torch.tensor([g.PRONOUNS.index(noun[2]) for noun in g.NOUNS])[lemma[:, 0]]
    pronoun = g.first_pronoun + torch.where(plural[:, 0].bool(), len(g.PRONOUNS) - 1, pronoun)
    rows = torch.arange(batch)
    verb_at, pronoun_at = position[:, 12], position[:, 15]  # (B,)
    targets = torch.full((batch, AGREEMENT_LENGTH), IGNORE_INDEX)
    targets[rows, verb_at], targets[rows, pronoun_at] = verb, pronoun
    antecedent = torch.full((batch, AGREEMENT_LENGTH), IGNORE_INDEX)
    antecedent[rows, verb_at] = antecedent[rows, pronoun_at] = position[:, 3]
    nearest = plural.gather(1, n_phrases[:, None])[:, 0]  # (B,): the last noun before the verb
    attracted = nearest != plural[:, 0]
    return AgreementBatch(inputs.to(device), targets.to(device), antecedent.to(device),
                          attracted.to(device))


def broken_palindromes(vocab: ToyVocab, batch: int, half_len: int,
                       generator: torch.Generator | None = None,
                       device: torch.device | str | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """A tagging task on the MLM corpus: which symbols break the mirror?

    Half the sequences are :func:`palindromes`; in the other half one symbol is replaced by
    another, so that it and its mirror partner no longer match. Returns ``tokens``
    (batch, 2 * half_len + 2) and ``labels`` of the same shape: 1 where a symbol differs from
    its mirror partner, 0 where it matches, :data:`IGNORE_INDEX` on ``<cls>`` and ``<sep>``.
    """
    tokens = palindromes(vocab, batch, half_len, generator)  # (B, L)
    L = tokens.shape[1]
    rows = torch.arange(batch)
    position = torch.randint(1, L - 1, (batch,), generator=generator)  # (B,): a symbol
    shift = torch.randint(1, vocab.n_symbols, (batch,), generator=generator)  # never 0
    replaced = vocab.first_symbol + (tokens[rows, position] - vocab.first_symbol + shift) % (
        vocab.n_symbols)
    broken = torch.rand(batch, generator=generator) < 0.5  # (B,)
    tokens[rows, position] = torch.where(broken, replaced, tokens[rows, position])
    labels = (tokens != tokens.flip(1)).long()  # (B, L): differs from its mirror partner
    labels[:, 0] = labels[:, -1] = IGNORE_INDEX
    return tokens.to(device), labels.to(device)


def query_accuracy(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor
                    ) -> float:
    """Share of the scored positions (targets not :data:`IGNORE_INDEX`) where the model's
    most likely token is the target. model: (B, L) token ids -> (B, L, vocab) logits."""
    with torch.no_grad():
        predicted = model(tokens).argmax(dim=-1)  # (B, L)
    scored = targets != IGNORE_INDEX
    return (predicted[scored] == targets[scored]).float().mean().item()


def train_associative_recall(model: torch.nn.Module, n_pairs: int, vocab_size: int,
                             steps: int, batch: int = 32, lr: float = 1e-2,
                             generator: torch.Generator | None = None,
                             test: tuple[torch.Tensor, torch.Tensor] | None = None,
                             test_every: int | None = None) -> list[float]:
    """Train ``model`` on multi-query associative recall (:func:`associative_recall_task`),
    the same way for every model that lessons 08 and 11 compare.

    Adam with learning rate ``lr`` for ``steps`` steps, each on ``batch`` fresh sequences of
    ``n_pairs`` pairs (every key asked), drawn from ``generator`` on the model's device; the
    loss is the cross-entropy at the queries. Returns the :func:`query_accuracy` on ``test``
    (tokens, targets) after every ``test_every`` steps and after the last; by default only
    after the last, on 256 fresh sequences drawn then.
    """
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    accuracies = []
    for step in range(1, steps + 1):
        tokens, targets = associative_recall_task(batch, n_pairs, vocab_size, n_pairs,
                                                  generator=generator, device=device)
        logits = model(tokens)  # (B, L, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                 ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if test is not None and test_every and step % test_every == 0 and step < steps:
            accuracies.append(query_accuracy(model, *test))
    if test is None:
        test = associative_recall_task(256, n_pairs, vocab_size, n_pairs, generator=generator,
                                       device=device)
    accuracies.append(query_accuracy(model, *test))
    return accuracies


def rule_stream(batch: int, n_pairs: int, n_symbols: int = 16, n_rules: int = 4,
                generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A rule stated once at the start and applied to the end (lesson 09's eviction test).

    Each sequence is ``<bos> rule x1 y1 x2 y2 ... xN yN``: ``x`` are random symbols, and
    ``y = (x + 1 + 5 * rule) mod n_symbols``. Every answer depends on the second token, so a
    cache that evicts the first tokens loses the rule. (The rules' offsets 1, 6, 11, ... have
    no common residue modulo 4 or 8; evenly spaced offsets such as 1, 5, 9, 13 would all
    agree on ``y mod 4``, and a small model then stalls for long on that half-answer.) Ids:
    symbols ``0 .. n_symbols - 1``, rules ``n_symbols .. n_symbols + n_rules - 1``,
    ``<bos>`` = ``n_symbols + n_rules``. Returns ``inputs`` (batch, 2N + 1) and ``targets``
    (batch, 2N + 1), the next tokens, scored (not :data:`IGNORE_INDEX`) only where they are
    a ``y``.
    """
    offsets = [(1 + 5 * rule) % n_symbols for rule in range(n_rules)]
    if len(set(offsets)) != n_rules:
        raise ValueError(f"{n_rules} rules need {n_rules} different offsets modulo "
                         f"n_symbols={n_symbols}, got {offsets}")
    rules = torch.randint(n_rules, (batch,), generator=generator)  # (B,)
    x = torch.randint(n_symbols, (batch, n_pairs), generator=generator)  # (B, N)
    y = (x + torch.tensor(offsets)[rules][:, None]) % n_symbols  # (B, N)
    bos = torch.full((batch, 1), n_symbols + n_rules)  # (B, 1)
    sequence = torch.cat([bos, n_symbols + rules[:, None],
                          torch.stack([x, y], dim=-1).flatten(1)], dim=1)  # (B, 2N + 2)
    inputs, targets = sequence[:, :-1], sequence[:, 1:].clone()
    targets[:, 0] = IGNORE_INDEX  # the rule: not predictable
    targets[:, 1::2] = IGNORE_INDEX  # the x: random
    return inputs.to(device), targets.to(device)
