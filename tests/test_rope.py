"""helpers.rope by its definition and the property that makes it a relative position
encoding (tests/test_llama.py compares it with Hugging Face's own RoPE)."""

from __future__ import annotations

import pytest
import torch

from helpers.rope import apply_rope, rope, rope_cos_sin, rope_frequencies, rotate_half


def test_scores_depend_only_on_the_distance():
    """q_m · k_n after rotation is a function of m - n: shifting both positions changes nothing."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, 16, generator=g, dtype=torch.float64)

    def score(m: int, n: int) -> float:
        return float((rope(q, torch.tensor([m])) * rope(k, torch.tensor([n]))).sum())

    for m, n in [(0, 0), (5, 2), (2, 5), (40, 3)]:
        for shift in (1, 7, 1000):
            # the angles are float32, as in Hugging Face: 1e-4 at positions ~1000
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-4)
    assert abs(score(5, 2) - score(2, 5)) > 1e-3  # but the sign of the distance matters


def test_rotation_keeps_norms_and_position_zero_is_identity():
    x = torch.randn(2, 3, 6, 10, dtype=torch.float64)
    positions = torch.arange(6) * 13
    torch.testing.assert_close(rope(x, positions).norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rope(x, torch.zeros(6, dtype=torch.long)), x)


def test_rotate_half_pairs_the_two_halves():
    x = torch.arange(6.0)
    assert rotate_half(x).tolist() == [-3.0, -4.0, -5.0, 0.0, 1.0, 2.0]
    freqs = rope_frequencies(6, base=100.0)
    torch.testing.assert_close(freqs, torch.tensor([1.0, 100 ** (-2 / 6), 100 ** (-4 / 6)]))


def test_errors_name_the_sizes():
    with pytest.raises(ValueError, match="even"):
        rope_frequencies(7)
    cos, sin = rope_cos_sin(torch.arange(3), 8)
    with pytest.raises(ValueError, match="head_dim=4"):
        apply_rope(torch.randn(1, 1, 3, 4), cos, sin)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runs_on_cuda():
    x = torch.randn(1, 2, 5, 8)
    positions = torch.arange(5)
    torch.testing.assert_close(rope(x.cuda(), positions.cuda()).cpu(), rope(x, positions))
