"""The multi-query associative recall task (MQAR, Arora et al., 2023): every query asks a key
of its own sequence, and its target is the value that followed that key."""

from __future__ import annotations

import pytest
import torch

from helpers.tasks import IGNORE_INDEX, associative_recall_task


@pytest.mark.parametrize("n_pairs, n_queries", [(1, 1), (5, 3), (8, None), (16, 16)])
def test_each_query_asks_for_the_value_that_followed_its_key(n_pairs, n_queries):
    vocab = 40
    tokens, targets = associative_recall_task(6, n_pairs, vocab, n_queries,
                                              generator=torch.Generator().manual_seed(n_pairs))
    Q = n_pairs if n_queries is None else n_queries
    assert tokens.shape == targets.shape == (6, 2 * n_pairs + Q)
    assert tokens.dtype == targets.dtype == torch.int64
    for row, target in zip(tokens.tolist(), targets.tolist()):
        keys, values, queries = row[0:2 * n_pairs:2], row[1:2 * n_pairs:2], row[2 * n_pairs:]
        assert len(set(keys)) == n_pairs and all(0 <= key < vocab // 2 for key in keys)
        assert all(vocab // 2 <= value < vocab for value in values)
        assert len(set(queries)) == Q and set(queries) <= set(keys)
        assert target[:2 * n_pairs] == [IGNORE_INDEX] * (2 * n_pairs)
        assert target[2 * n_pairs:] == [values[keys.index(query)] for query in queries]


def test_a_generator_repeats_the_draw_and_the_device_is_honoured():
    first = associative_recall_task(3, 4, 20, 2, generator=torch.Generator().manual_seed(7),
                                    device="cpu")
    second = associative_recall_task(3, 4, 20, 2, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert first[0].device.type == "cpu"


def test_queries_come_in_random_order_over_the_batch():
    tokens, _ = associative_recall_task(64, 6, 40, 6, generator=torch.Generator().manual_seed(0))
    keys, queries = tokens[:, 0:12:2], tokens[:, 12:]
    assert not bool((keys == queries).all())  # not simply asked in the order they were given


@pytest.mark.parametrize("n_pairs, vocab, n_queries, message", [
    (11, 20, None, "n_pairs should be in 1 .. vocab_size // 2 = 10"),
    (0, 20, None, "n_pairs should be in"),
    (4, 20, 5, "n_queries should be in 1 .. n_pairs = 4"),
])
def test_impossible_sizes_are_refused(n_pairs, vocab, n_queries, message):
    with pytest.raises(ValueError, match=message):
        associative_recall_task(2, n_pairs, vocab, n_queries)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_draws_on_a_cuda_generator():
    generator = torch.Generator(device="cuda").manual_seed(0)
    tokens, targets = associative_recall_task(2, 4, 20, generator=generator, device="cuda")
    assert tokens.device.type == "cuda" and targets.device.type == "cuda"
