"""Small mistakes that the model-level oracles can miss, caught without Hugging Face: each test
checks one definition against values worked out from the paper, or a property that a typical
slip breaks (RMSNorm's epsilon, the float32 upcast of half-precision attention, top-k and
temperature sampling, T5's relative-position buckets, GPT's padding mask on keys)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers.attention import scaled_dot_product_attention
from helpers.transformer import GPT, RMSNorm, next_token, relative_position_bucket


# RMSNorm (Zhang & Sennrich, 2019): y = x / sqrt(mean(x²) + eps) · g -------------------------

def rms_formula(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 1e3])
def test_rmsnorm_is_the_formula_where_eps_matters(magnitude):
    """At |x| ~ 1e-3 the mean square (1e-6) is as small as eps: where eps sits decides the
    output (x / (sqrt(ms) + eps) differs by up to 30 % there)."""
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16, generator=g) + 0.5)
    x = torch.randn(4, 5, 16, generator=g, dtype=torch.float64) * magnitude
    out = norm.double()(x)
    torch.testing.assert_close(out, rms_formula(x, norm.weight, 1e-6), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rmsnorm_in_half_precision_is_computed_in_float32(dtype):
    """Squares of half-precision values lose bits (and float16 overflows past 256²): the mean
    square is taken in float32, so the result is the float64 formula rounded to the dtype."""
    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(64, eps=1e-6).to(dtype)
    x = (torch.randn(8, 64, generator=g) * 300).to(dtype)  # float16: x² overflows
    out = norm(x)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    expected = rms_formula(x, norm.weight, 1e-6).to(dtype)
    assert ulps(out, expected, dtype) <= 1


# Half-precision attention is computed in float32 ------------------------------------------

def ulps(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
         floor: float = 1 / 16) -> float:
    """Largest difference in units in the last place of ``dtype`` at the expected value's
    magnitude (at least ``floor``, so that values near zero do not divide by nothing)."""
    scale = 2.0 ** torch.floor(torch.log2(expected.double().abs().clamp_min(floor)))
    return float(((actual.double() - expected.double()).abs() / (scale * torch.finfo(dtype).eps)).max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(5))
def test_half_precision_attention_is_exactly_rounded(dtype, seed):
    """Computed in float32 and rounded once, the output is within one unit in the last place
    of the float64 result; a softmax taken in the half-precision dtype itself is 5 to 11 units
    off on these inputs."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g, dtype=torch.float64).to(dtype)
               for n in (9, 33, 33))
    out, weights = scaled_dot_product_attention(q, k, v)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert out.dtype == dtype
    assert ulps(out, expected.to(dtype), dtype) <= 1


# Sampling (Fan et al., 2018, for top-k) -------------------------------------------------------

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.2, -1.0, -3.0])
N_DRAWS = 40_000  # each frequency within 0.012 of its probability, 5 standard deviations


def frequencies(**options) -> torch.Tensor:
    """How often each token is drawn from ``LOGITS``, over N_DRAWS seeded draws."""
    rows = LOGITS.expand(N_DRAWS, -1)
    tokens = next_token(rows, do_sample=True, generator=torch.Generator().manual_seed(0), **options)
    return torch.bincount(tokens[:, 0], minlength=len(LOGITS)).double() / N_DRAWS


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_draws_from_softmax_of_scaled_logits(temperature):
    expected = torch.softmax(LOGITS.double() / temperature, dim=-1)
    assert float((frequencies(temperature=temperature) - expected).abs().max()) < 0.012


@pytest.mark.parametrize("top_k", [1, 2, 3, 6])
def test_top_k_keeps_exactly_the_k_largest_and_renormalises(top_k):
    expected = torch.zeros(len(LOGITS), dtype=torch.float64)
    expected[:top_k] = torch.softmax(LOGITS[:top_k].double(), dim=-1)  # LOGITS are sorted
    found = frequencies(top_k=top_k)
    assert bool((found[top_k:] == 0).all()), f"tokens outside the top {top_k} were drawn"
    assert float((found - expected).abs().max()) < 0.012


# T5's relative-position buckets (Raffel et al., 2020) ----------------------------------------
# relative_position = key - query. Bidirectional, 32 buckets: 16 per direction, keys after the
# query take buckets 16..31. Distances below max_exact = 8 get a bucket each; a distance n >= 8
# gets 8 + floor(log(n / 8) / log(128 / 8) · (16 - 8)), capped at 15. Worked out by hand:
#   n = 12: log(1.5)/log(16) · 8 = 1.17 -> 9        n = 20: log(2.5)/log(16) · 8 = 2.64 -> 10
#   n = 60: log(7.5)/log(16) · 8 = 5.81 -> 13       n = 127: 7.98 -> 15;  n >= 128: 15 (cap)
# Decoder (unidirectional), 32 buckets: only keys before the query count (later ones -> 0);
# max_exact = 16, n >= 16 gets 16 + floor(log(n / 16) / log(128 / 16) · 16), capped at 31:
#   n = 20: log(1.25)/log(8) · 16 = 1.72 -> 17      n = 40: log(2.5)/log(8) · 16 = 7.05 -> 23
#   n = 127: 15.94 -> 31

BIDIRECTIONAL = {0: 0, -1: 1, 1: 17, -3: 3, 3: 19, -7: 7, 7: 23, -8: 8, 8: 24, -12: 9, -20: 10,
                 20: 26, -60: 13, -127: 15, -128: 15, -1000: 15, 1000: 31}
DECODER = {5: 0, 0: 0, -5: 5, -15: 15, -16: 16, -20: 17, -40: 23, -127: 31, -500: 31}


@pytest.mark.parametrize("bidirectional, table", [(True, BIDIRECTIONAL), (False, DECODER)])
def test_t5_buckets_match_the_definition_worked_by_hand(bidirectional, table):
    positions = torch.tensor(list(table))
    buckets = relative_position_bucket(positions, bidirectional=bidirectional)
    assert dict(zip(table, buckets.tolist())) == table


# GPT's padding mask hides padded keys, not queries ------------------------------------------

def test_gpt_padding_hides_the_padded_keys():
    """With left padding, what sits under the padding must not change any real position's
    logits (the mask is on the keys); the padded rows themselves stay finite."""
    torch.manual_seed(0)
    model = GPT(50, 32, n_layers=2, n_heads=4, max_len=16).eval()
    idx = torch.randint(0, 50, (2, 10))
    real = torch.ones(2, 10, dtype=torch.bool)
    real[1, :4] = False  # sequence 1: four pads, then six tokens
    other = idx.clone()
    other[1, :4] = (other[1, :4] + 7) % 50  # different ids under the padding
    with torch.no_grad():
        logits = model(idx, attention_mask=real)
        assert bool(torch.isfinite(logits).all())
        torch.testing.assert_close(model(other, attention_mask=real)[1, 4:], logits[1, 4:])
        assert not torch.allclose(model(other)[1, 4:], model(idx)[1, 4:]), \
            "without the mask the padded tokens should matter: the test would not see a dropped mask"
