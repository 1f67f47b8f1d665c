"""Linear attention's three forms against each other, against the plain formula
φ(Q)(φ(K)ᵀV) normalised, and against PyTorch: softmax attention whose scores are
log(φ(q)·φ(k)) *is* linear attention (exp(log s) / Σ exp(log s) = s / Σ s), so
``F.scaled_dot_product_attention`` with those scores is an oracle for values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian
from torch.nn.attention.bias import causal_lower_right

from helpers.linear_attention import METHODS, LinearAttention, elu_feature_map, linear_attention


def sdpa_oracle(q, k, v, causal, feature_map=elu_feature_map):
    """Linear attention through PyTorch's softmax attention, with zero queries and keys and
    the log-similarities as an additive mask. Rows that see no key give 0 (not NaN)."""
    scores = (feature_map(q) @ feature_map(k).transpose(-2, -1)).log()  # (..., L, S)
    if causal:
        allowed = causal_lower_right(q.shape[-2], k.shape[-2])._materialize(q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
    zeros_q, zeros_k = torch.zeros_like(q[..., :1]), torch.zeros_like(k[..., :1])
    out = F.scaled_dot_product_attention(zeros_q, zeros_k, v, attn_mask=scores)
    return out.nan_to_num(0.0)


def inputs(seed, L, S, D=5, Dv=3, lead=(2, 3), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*lead, n, d, generator=g, dtype=dtype)
                 for n, d in ((L, D), (S, D), (S, Dv)))


SIZES = [(7, 7), (1, 1), (5, 12), (64, 64), (65, 65), (130, 130), (3, 70)]


@pytest.mark.parametrize("L, S", SIZES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_every_form_equals_softmax_attention_on_log_similarities(L, S, causal, method):
    q, k, v = inputs(L * 100 + S, L, S)
    out = linear_attention(q, k, v, causal=causal, method=method)
    torch.testing.assert_close(out, sdpa_oracle(q, k, v, causal), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 16, 64, 200])
def test_chunked_form_any_chunk_size_with_a_ragged_last_chunk(chunk_size):
    q, k, v = inputs(chunk_size, 37, 37)
    expected = linear_attention(q, k, v, causal=True, method="recurrent")
    got = linear_attention(q, k, v, causal=True, method="chunked", chunk_size=chunk_size)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_not_causal_is_the_plain_formula(method):
    q, k, v = inputs(1, 9, 13)
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    numerator = torch.einsum("bhlf,bhsf,bhsd->bhld", phi_q, phi_k, v)  # φ(Q)(φ(K)ᵀV)
    normaliser = torch.einsum("bhlf,bhsf->bhl", phi_q, phi_k)[..., None]  # φ(Q)Σφ(K)
    torch.testing.assert_close(linear_attention(q, k, v, method=method), numerator / normaliser)


@pytest.mark.parametrize("method", METHODS)
def test_causal_is_the_masked_plain_formula(method):
    q, k, v = inputs(2, 11, 11)
    weights = torch.einsum("bhlf,bhsf->bhls", F.elu(q) + 1, F.elu(k) + 1).tril()
    expected = weights @ v / weights.sum(-1, keepdim=True)
    torch.testing.assert_close(linear_attention(q, k, v, causal=True, method=method), expected)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_gradients_equal_autograd_through_the_oracle(causal, method):
    q, k, v = (t.requires_grad_() for t in inputs(3, 10, 10))
    dout = torch.randn(2, 3, 10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    ours = torch.autograd.grad(linear_attention(q, k, v, causal=causal, method=method,
                                                chunk_size=4), (q, k, v), dout)
    theirs = torch.autograd.grad(sdpa_oracle(q, k, v, causal), (q, k, v), dout)
    for got, expected in zip(ours, theirs):
        torch.testing.assert_close(got, expected)


def test_any_leading_dims_and_a_feature_map_of_another_size():
    def bigger(x):  # 2D features: [elu + 1, (elu + 1)²], positive
        phi = elu_feature_map(x)
        return torch.cat([phi, phi**2], dim=-1)

    for lead in [(), (4,), (2, 2, 3)]:
        q, k, v = inputs(4, 6, 8, lead=lead)
        expected = sdpa_oracle(q, k, v, True, feature_map=bigger)
        for method in METHODS:
            got = linear_attention(q, k, v, causal=True, feature_map=bigger, method=method)
            torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


def test_queries_that_see_no_key_get_zeros():
    q, k, v = inputs(5, 6, 2)  # causal, L > S: the first 4 queries see nothing
    for method in METHODS:
        out = linear_attention(q, k, v, causal=True, method=method, chunk_size=1)
        assert bool((out[..., :4, :] == 0).all()) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keeps_the_dtype_of_its_inputs(dtype):
    q, k, v = inputs(6, 5, 5, dtype=dtype)
    for method in METHODS:
        assert linear_attention(q, k, v, causal=True, method=method).dtype == dtype


@pytest.mark.parametrize("kwargs, message", [
    (dict(feature_map=lambda x: x), "negative features"),
    (dict(feature_map=F.elu), "negative features"),
    (dict(method="quadratic"), "method should be one of"),
    (dict(chunk_size=0), "chunk_size should be a positive"),
])
def test_clear_errors(kwargs, message):
    q, k, v = inputs(7, 4, 4)
    with pytest.raises(ValueError, match=message):
        linear_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("shapes, message", [
    (((2, 4, 5), (2, 4, 6), (2, 4, 3)), "must share D"),
    (((2, 4, 5), (2, 6, 5), (2, 4, 3)), "must share S"),
    (((5,), (5,), (5,)), "at least 2 dims"),
])
def test_shape_errors_name_the_shapes(shapes, message):
    q, k, v = (torch.randn(*shape) for shape in shapes)
    with pytest.raises(ValueError, match=message):
        linear_attention(q, k, v)


def test_module_is_causal_by_the_gradient_test():
    torch.manual_seed(0)
    layer = LinearAttention(d_model=8, n_heads=2).double()
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    dependence = jacobian(lambda inp: layer(inp)[0].sum(-1), x)[:, 0].abs().sum(-1)  # (L, L)
    assert bool((dependence.triu(1) == 0).all())  # no output depends on a later input
    past = torch.ones(6, 6, dtype=torch.bool).tril()
    assert bool((dependence[past] > 0).all())  # and each on itself and every earlier one


def test_module_forms_agree():
    torch.manual_seed(1)
    layers = {method: LinearAttention(12, 3, method=method, chunk_size=4).double()
              for method in METHODS}
    for layer in list(layers.values())[1:]:
        layer.load_state_dict(layers["parallel"].state_dict())
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    outs = [layer(x) for layer in layers.values()]
    assert outs[0].shape == (2, 9, 12)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", METHODS)
def test_runs_on_cuda(method):
    q, k, v = (t.cuda() for t in inputs(8, 33, 33))
    out = linear_attention(q, k, v, causal=True, method=method, chunk_size=8)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out, sdpa_oracle(q, k, v, True))
