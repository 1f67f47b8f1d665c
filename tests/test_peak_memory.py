"""helpers.device.peak_memory: the tensor memory a call holds at its worst, checked on calls
whose allocations are known exactly (float32 elements are 4 bytes)."""

from __future__ import annotations

import pytest
import torch

from helpers.device import peak_memory

MIB = 2**20


def test_counts_live_tensors_at_their_peak_and_frees_the_dead():
    def fn():
        a = torch.ones(MIB // 4)  # 1 MiB
        del a
        b = torch.ones(MIB // 2)  # 2 MiB, while nothing else is alive
        c = b * 2  # 2 MiB more: 4 MiB live
        return c.sum()

    assert peak_memory(fn, "cpu") == 4 * MIB + 4  # and the 4-byte scalar sum


def test_views_in_place_ops_and_existing_tensors_are_not_new_memory():
    x = torch.zeros(MIB // 4)

    def fn():
        y = x.view(2, -1).t()  # a view of x
        y.add_(1.0)  # in place
        return x[:10].clone()  # 40 bytes

    assert peak_memory(fn, "cpu") == 40


def test_attention_scores_are_counted():
    q = k = torch.randn(1, 2, 256, 8)
    # scores (1, 2, 256, 256) and their softmax, both float32: 2 x 512 KiB at once
    assert peak_memory(lambda: torch.softmax(q @ k.transpose(-2, -1), -1), "cpu") == MIB


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_uses_the_allocator_peak():
    assert peak_memory(lambda: torch.ones(MIB // 4, device="cuda") * 2, "cuda") >= 2 * MIB
