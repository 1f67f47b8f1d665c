"""The KV cache: it returns exactly what was appended, in order, without copying the past
at every step, and it counts its bytes like the formula."""

from __future__ import annotations

import pytest
import torch

from helpers.kv_cache import KVCache, kv_cache_bytes


def test_kv_cache_bytes_of_a_published_config():
    # Llama 2 7B: 32 layers, 32 K/V heads of 128 channels; 4096 tokens in float16 = 2 GiB
    assert kv_cache_bytes(32, 32, 128, 4096) == 2 * 2**30
    assert kv_cache_bytes(32, 8, 128, 4096, batch=3, bytes_per_elem=1) == 3 * 2**30 // 4


def test_update_returns_everything_in_order_across_growth():
    cache = KVCache(n_layers=2, capacity=2)
    g = torch.Generator().manual_seed(0)
    ks, vs = [], []
    for T in (3, 1, 1, 5, 1, 1):
        k, v = torch.randn(2, 3, T, 4, generator=g), torch.randn(2, 3, T, 5, generator=g)
        ks.append(k), vs.append(v)
        k_all, v_all = cache.update(1, k, v)
        assert torch.equal(k_all, torch.cat(ks, dim=2)) and torch.equal(v_all, torch.cat(vs, dim=2))
    assert cache.held(1) == 12 and cache.held(0) == 0
    assert cache.nbytes == 12 * 2 * 3 * (4 + 5) * 4
    assert cache.allocated_nbytes == 16 * 2 * 3 * (4 + 5) * 4  # 2 -> 4 -> 8 -> 16


def test_appending_one_token_does_not_copy_the_past():
    cache = KVCache(n_layers=1, capacity=8)
    k_all, _ = cache.update(0, torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
    storage = k_all.untyped_storage().data_ptr()
    for _ in range(5):
        k_all, _ = cache.update(0, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
        assert k_all.untyped_storage().data_ptr() == storage
    assert k_all.shape == (1, 1, 8, 2)


def test_mistakes_name_the_shapes():
    cache = KVCache(n_layers=2)
    with pytest.raises(ValueError, match=r"\(B, H_kv, T, D\)"):
        cache.update(0, torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    cache.update(0, torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 4))
    with pytest.raises(ValueError, match="holds keys"):
        cache.update(0, torch.zeros(1, 3, 1, 4), torch.zeros(1, 3, 1, 4))
    with pytest.raises(IndexError, match="layer 2"):
        cache.update(2, torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 4))
