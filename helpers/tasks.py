"""Synthetic tasks: small, seeded, generated on the fly, so nothing is ever downloaded.

Token ids are ``int64``; a target of :data:`IGNORE_INDEX` marks a position that is not
scored (the default ``ignore_index`` of ``torch.nn.functional.cross_entropy``).
"""

from __future__ import annotations

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


def _reverse(words: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, N) -> (B, N): the first ``lengths[b]`` symbols of row ``b`` in reverse order."""
    positions = torch.arange(words.shape[1])  # (N,)
    source = (lengths[:, None] - 1 - positions).clamp(min=0)  # (B, N)
    return words.gather(1, source)


def _sort(words: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, N) -> (B, N): the first ``lengths[b]`` symbols of row ``b`` in ascending order."""
    beyond = torch.arange(words.shape[1]) >= lengths[:, None]  # (B, N)
    return words.masked_fill(beyond, torch.iinfo(words.dtype).max).sort(dim=1).values


TEXT_TO_TEXT_TASKS = {
    "copy": lambda words, lengths: words,
    "reverse": _reverse,
    "sort": _sort,
}


def text_to_text(vocab: ToyVocab, batch: int, min_len: int, max_len: int,
                 generator: torch.Generator | None = None,
                 device: torch.device | str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Several tasks as one text-to-text problem (Raffel et al., 2020, "Exploring the Limits
    of Transfer Learning with a Unified Text-to-Text Transformer").

    Each example draws a task from ``vocab.tasks`` and ``length`` symbols ``w``:
    ``input_ids`` (batch, max_len + 2) is ``task: w </s>`` then ``<pad>``; ``labels``
    (batch, max_len + 1) is ``task(w) </s>`` then :data:`IGNORE_INDEX`.
    """
    if not vocab.tasks:
        raise ValueError("text_to_text needs a ToyVocab built with tasks, e.g. ('reverse', 'sort')")
    task = torch.randint(len(vocab.tasks), (batch,), generator=generator)  # (B,)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=generator)  # (B,)
    words = vocab.first_symbol + torch.randint(vocab.n_symbols, (batch, max_len),
                                               generator=generator)  # (B, N)
    answers = torch.stack([TEXT_TO_TEXT_TASKS[name](words, lengths)
                           for name in vocab.tasks])  # (T, B, N)
    answers = answers.gather(0, task[None, :, None].expand(1, batch, max_len))[0]  # (B, N)
    positions = torch.arange(max_len + 1)  # (N + 1,)
    is_word = positions < lengths[:, None]  # (B, N + 1)
    is_eos = positions == lengths[:, None]  # (B, N + 1)
    end = torch.full((batch, 1), vocab.pad_id)  # (B, 1)
    source = torch.cat([words, end], dim=1).where(is_word, vocab.pad_id)  # (B, N + 1)
    source = source.masked_fill(is_eos, vocab.eos_id)
    prefix = torch.tensor([vocab.task_id(name) for name in vocab.tasks])[task]  # (B,)
    input_ids = torch.cat([prefix[:, None], source], dim=1)  # (B, N + 2)
    labels = torch.cat([answers, end], dim=1).where(is_word, IGNORE_INDEX)  # (B, N + 1)
    labels = labels.masked_fill(is_eos, vocab.eos_id)
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
