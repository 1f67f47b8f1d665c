"""helpers.ssm against Hugging Face's Mamba, an oracle nobody here wrote: the selective scan
against the pure-PyTorch ``mamba_selective_scan`` of ``transformers.models.mamba`` (the path
taken without the CUDA kernels), and ``Mamba.from_hf`` against ``MambaForCausalLM`` built
offline from small random configs: logits, and greedy tokens from HF's own ``generate``."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

try:  # part of the test extra: CI must never silently lose its external references
    import transformers
except ImportError as error:
    raise ImportError("the oracle tests need Hugging Face transformers, part of the test extra: "
                      "pip install -e '.[test]'") from error

from transformers.models.mamba import modeling_mamba  # noqa: E402

from helpers.ssm import Mamba, selective_scan  # noqa: E402

VOCAB = 97
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def hf_selective_scan():
    """transformers' pure-PyTorch selective scan: ``mamba_selective_scan`` without the wrapper
    that would dispatch to the ``mamba-ssm`` CUDA kernels when they are installed."""
    if not hasattr(modeling_mamba, "mamba_selective_scan"):
        pytest.skip(f"transformers {transformers.__version__} has no mamba_selective_scan "
                    "(its scan is inside MambaMixer.slow_forward; the model tests below use it)")
    return inspect.unwrap(modeling_mamba.mamba_selective_scan)


def scan_inputs(batch: int, D: int, N: int, L: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, D, L, generator=g)
    delta = F.softplus(torch.randn(batch, D, L, generator=g) - 1)
    A = -torch.exp(torch.randn(D, N, generator=g))
    B, C = torch.randn(batch, N, L, generator=g), torch.randn(batch, N, L, generator=g)
    return [u, delta, A, B, C, torch.randn(D, generator=g)]


@pytest.mark.parametrize("method", ["sequential", "parallel"])
@pytest.mark.parametrize("L", [1, 6, 45])
def test_selective_scan_and_gradients_match_hf(method, L):
    reference = hf_selective_scan()
    inputs = [t.requires_grad_() for t in scan_inputs(2, 6, 5, L, seed=L)]
    ours, our_state = selective_scan(*inputs, method=method, return_state=True)
    u, delta, A, B, C, D = inputs
    theirs, their_state = reference(u, delta, A, B, C, D=D, return_last_state=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_state, their_state, atol=1e-5, rtol=1e-5)
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1))
    grads = [torch.autograd.grad((y * weights).sum(), inputs, materialize_grads=True)
             for y in (ours, theirs)]  # with L = 1, A has no effect: a zero gradient
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def jitter(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Noise on every parameter: fresh norms are ones and fresh A_log rows all equal, so a
    weight loaded into the wrong place would otherwise go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g).to(p))
    return model.eval()


CONFIGS = {
    # odd state size and conv width, an explicit time_step_rank, no conv bias, untied head
    "odd": dict(hidden_size=24, state_size=7, conv_kernel=3, time_step_rank=5,
                use_conv_bias=False, use_bias=True, tie_word_embeddings=False,
                num_hidden_layers=3, layer_norm_epsilon=1e-4),
    # Mamba's defaults at a small width: N = 16, 4 taps, rank ceil(d/16), tied embeddings
    "default": dict(hidden_size=32, num_hidden_layers=2),
    # expand 3, a one-tap convolution (an empty conv state), a single state per channel
    "narrow": dict(hidden_size=16, expand=3, state_size=1, conv_kernel=1, time_step_rank=2,
                   num_hidden_layers=2),
}


def make_hf_mamba(name: str) -> torch.nn.Module:
    config = transformers.MambaConfig(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None,
                                      pad_token_id=None, **CONFIGS[name])
    torch.manual_seed(0)
    return jitter(transformers.MambaForCausalLM(config), seed=3)


@pytest.fixture(scope="module", params=list(CONFIGS))
def hf_mamba(request):
    return make_hf_mamba(request.param)


@pytest.mark.parametrize("scan_method", ["sequential", "parallel"])
def test_mamba_logits_match_hf(hf_mamba, scan_method):
    ours = Mamba.from_hf(hf_mamba)
    for block in ours.blocks:
        block.mixer.scan_method = scan_method
    idx = torch.randint(0, VOCAB, (3, 29), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = hf_mamba(idx, use_cache=False).logits
        torch.testing.assert_close(ours(idx), theirs, atol=2e-5 * float(theirs.abs().max()),
                                   rtol=1e-5)


def test_mamba_greedy_generation_matches_hf(hf_mamba):
    ours = Mamba.from_hf(hf_mamba)
    idx = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    theirs = hf_mamba.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=16,
                               do_sample=False)
    mine = ours.generate(idx, 16)
    assert len(set(mine[:, 7:].flatten().tolist())) > 2, "degenerate: one token repeated"
    assert torch.equal(mine, theirs)


def test_from_hf_reads_the_config(hf_mamba):
    ours = Mamba.from_hf(hf_mamba)
    c = hf_mamba.config
    mixer = ours.blocks[0].mixer
    assert (mixer.d_state, mixer.d_conv, mixer.dt_rank) == (c.state_size, c.conv_kernel,
                                                            c.time_step_rank)
    assert (mixer.conv1d.bias is not None) == c.use_conv_bias
    assert (ours.lm_head.weight is ours.embedding.weight) == c.tie_word_embeddings
    assert ours.norm.eps == c.layer_norm_epsilon


def test_from_hf_rejects_another_activation():
    config = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                      hidden_act="gelu")
    with pytest.raises(ValueError, match="silu"):
        Mamba.from_hf(transformers.MambaForCausalLM(config))


@cuda
def test_mamba_on_cuda_matches_hf():
    hf = make_hf_mamba("odd").to("cuda")
    ours = Mamba.from_hf(hf)
    assert ours.lm_head.weight.device.type == "cuda"
    idx = torch.randint(0, VOCAB, (2, 21), device="cuda")
    with torch.no_grad():
        theirs = hf(idx, use_cache=False).logits
        torch.testing.assert_close(ours(idx), theirs, atol=1e-4 * float(theirs.abs().max()),
                                   rtol=1e-4)
