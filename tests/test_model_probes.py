"""Small mistakes that the model-level oracles can miss, caught without Hugging Face: each test
checks one definition against values worked out from the paper, or a property that a typical
slip breaks (RMSNorm's epsilon, the float32 upcast of half-precision attention, top-k and
temperature sampling, T5's relative-position buckets, GPT's padding mask on keys, BERT's
post-LN order against PyTorch's own encoder layers, T5's output scale with a tied head, the
SwiGLU gate)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers.attention import scaled_dot_product_attention
from helpers.transformer import (GPT, T5, BertEncoder, RMSNorm, SwiGLU, next_token,
                                relative_position_bucket)


# RMSNorm (Zhang & Sennrich, 2019): y = x / sqrt(mean(x²) + eps) · g -------------------------

def rms_formula(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.detach().double()


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
    error = (actual.detach().double() - expected.double()).abs()
    return float((error / (scale * torch.finfo(dtype).eps)).max())


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


# BERT is post-LN: PyTorch's own encoder layers, stacked, are the oracle ----------------------

def test_bert_encoder_is_embeddings_then_torch_post_ln_encoder_layers():
    """BERT (Devlin et al., 2019): token + position + segment embeddings, LayerNorm, then
    post-LN layers ``norm(x + sublayer(x))``, which is ``nn.TransformerEncoderLayer`` with
    ``norm_first=False``; padding hides keys (``src_key_padding_mask``)."""
    from test_transformer import copy_attention  # nn.MultiheadAttention's weights into ours

    torch.manual_seed(3)
    d, heads, d_ff, vocab = 32, 4, 48, 50
    model = BertEncoder(vocab, d, n_layers=2, n_heads=heads, max_len=16, d_ff=d_ff).double()
    with torch.no_grad():  # fresh norms are ones and zeros: make a misplaced norm visible
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    layers = []
    for block in model.blocks:
        layer = nn.TransformerEncoderLayer(d, heads, d_ff, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=False,
                                           layer_norm_eps=1e-12).double()
        copy_attention(block.attn, layer.self_attn)
        for mine, theirs in ((block.norm1, layer.norm1), (block.norm2, layer.norm2),
                             (block.mlp[0], layer.linear1), (block.mlp[2], layer.linear2)):
            theirs.load_state_dict(mine.state_dict())
        layers.append(layer.train())  # train mode, dropout 0: PyTorch's exact slow path
    idx = torch.randint(0, vocab, (2, 9))
    segments = (torch.arange(9) >= 5).long().expand(2, 9)
    real = torch.arange(9) < torch.tensor([9, 6])[:, None]  # (B, L)
    x = (model.token_embedding.weight[idx] + model.position_embedding.weight[:9]
         + model.token_type_embedding.weight[segments])
    x = F.layer_norm(x, (d,), model.embedding_norm.weight, model.embedding_norm.bias, 1e-12)
    for layer in layers:
        x = layer(x, src_key_padding_mask=~real)
    with torch.no_grad():
        hidden = model(idx, attention_mask=real, token_type_ids=segments)
    torch.testing.assert_close(hidden[real], x[real].detach(), atol=1e-10, rtol=1e-10)


# T5 scales the decoder output by d_model^-0.5 when its LM head is the embedding -------------

@pytest.mark.parametrize("tied", [True, False])
def test_t5_scales_the_decoder_output_only_when_the_head_is_tied(tied):
    """Mesh TensorFlow's T5 (and Hugging Face's): with tied embeddings the logits are
    ``(h · d_model^-0.5) Eᵀ``; an untied head reads h unscaled. Greedy decoding cannot see
    this (a positive factor keeps the argmax), the logits can."""
    torch.manual_seed(4)
    d, vocab = 32, 50
    model = T5(vocab, d, n_layers=1, n_heads=4, d_ff=48, tie_word_embeddings=tied).double().eval()
    src, tgt = torch.randint(0, vocab, (2, 6)), torch.randint(0, vocab, (2, 5))
    with torch.no_grad():
        states = model.encoder(model.shared(src))
        h = model.decoder(model.shared(tgt), context=states)  # (B, L, d)
        head = model.shared.weight if tied else model.lm_head.weight
        expected = (h * d ** -0.5 if tied else h) @ head.T
        torch.testing.assert_close(model(src, tgt), expected, atol=1e-12, rtol=1e-10)


# SwiGLU (Shazeer, 2020): down(silu(x W_gate) ⊙ x W_up) -----------------------------------------

def test_swiglu_gates_with_the_gate_projection():
    torch.manual_seed(5)
    mlp = SwiGLU(8, 12).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    gate, up, down = mlp.gate.weight, mlp.up.weight, mlp.down.weight
    expected = (F.silu(x @ gate.T) * (x @ up.T)) @ down.T
    torch.testing.assert_close(mlp(x), expected, atol=1e-12, rtol=1e-10)
