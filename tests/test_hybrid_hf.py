"""helpers.hybrid against Hugging Face models with the same weights, which nobody here wrote:
an all-attention stack with the weights of ``LlamaForCausalLM`` / ``MistralForCausalLM``
(logits and greedy tokens, with each attention kernel, GQA and a sliding window), an all-Mamba
stack with the weights of ``MambaForCausalLM``, and Jamba's layout against ``JambaConfig``.
The promises without an outside oracle are in tests/test_hybrid.py."""

from __future__ import annotations

import pytest
import torch

try:  # part of the test extra: CI must never silently lose its external references
    import transformers
except ImportError as error:
    raise ImportError("the oracle tests need Hugging Face transformers, part of the test extra: "
                      "pip install -e '.[test]'") from error

from helpers.hybrid import Hybrid, HybridConfig, jamba_layout
from helpers.kv_cache import SinkCache
from helpers.ssm import Mamba
from helpers.transformer import Llama

from test_hybrid import VOCAB, WINDOW, jitter, tokens


def assert_matches(ours: torch.Tensor, theirs: torch.Tensor, atol: float = 1e-5) -> None:
    """float32 agreement, relative to the size of the outputs."""
    torch.testing.assert_close(ours, theirs, atol=atol * max(float(theirs.abs().max()), 1.0),
                               rtol=1e-5)


def hf_greedy(hf: torch.nn.Module, idx: torch.Tensor, new: int) -> torch.Tensor:
    return hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new,
                       do_sample=False)


# --- layouts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n_layers, period, offset", [(8, 8, 4), (32, 8, 4), (12, 4, 1),
                                                       (5, 2, 0)])
def test_jamba_layout_matches_hugging_faces_jamba_config(n_layers, period, offset):
    config = transformers.JambaConfig(num_hidden_layers=n_layers, attn_layer_period=period,
                                      attn_layer_offset=offset)
    expected = "".join({"attention": "A", "mamba": "M"}[kind]
                       for kind in config.layers_block_type)
    assert jamba_layout(n_layers, period, offset) == expected


# --- an all-attention stack is a Llama / Mistral ---------------------------------------------

SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, bos_token_id=None, eos_token_id=None, pad_token_id=None,
             initializer_range=0.2)


def hybrid_from_llama(hf: torch.nn.Module, kernel: str = "sdpa") -> Hybrid:
    """An all-attention Hybrid with the weights of a Hugging Face Llama or Mistral (through
    ``Llama.from_hf``, whose names the hybrid's layers share)."""
    c, llama = hf.config, Llama.from_hf(hf)
    config = HybridConfig(c.vocab_size, c.hidden_size, "A" * c.num_hidden_layers,
                          n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads,
                          head_dim=llama.head_dim, rope_base=llama.rope_base,
                          window=getattr(c, "sliding_window", None), kernel=kernel,
                          d_ff=c.intermediate_size, norm_eps=c.rms_norm_eps,
                          tie_embeddings=c.tie_word_embeddings)
    model = Hybrid(config)
    weights = {name.replace("token_embedding.", "embedding.token.")
               .replace("blocks.", "layers.").replace(".attn.", ".mixer.attn."): w
               for name, w in llama.state_dict().items()}
    assert model.load_state_dict(weights, strict=True)
    return model.eval()


def make_llama(**options: object) -> torch.nn.Module:
    config = transformers.LlamaConfig(**{**SMALL, **options}, attn_implementation="eager")
    torch.manual_seed(0)
    return jitter(transformers.LlamaForCausalLM(config), seed=1)


def make_mistral() -> torch.nn.Module:
    config = transformers.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=WINDOW,
                                        attn_implementation="eager")
    torch.manual_seed(0)
    return jitter(transformers.MistralForCausalLM(config), seed=2)


@pytest.mark.parametrize("kernel", ["sdpa", "reference", "flash"])
@pytest.mark.parametrize("options", [dict(num_key_value_heads=2),
                                     dict(num_key_value_heads=1, head_dim=12, rope_theta=5e5)],
                         ids=["gqa", "mqa, head_dim 12"])
def test_an_all_attention_stack_matches_hf_llama(kernel, options):
    hf = make_llama(**options)
    ours = hybrid_from_llama(hf, kernel)
    idx = tokens(3, 11, seed=3)
    with torch.no_grad():
        assert_matches(ours(idx), hf(idx).logits)
    theirs = hf_greedy(hf, idx[:, :5], 12)
    mine = ours.generate(idx[:, :5], 12)
    assert len(set(mine[:, 5:].flatten().tolist())) > 3, "degenerate test: one token repeated"
    assert torch.equal(mine, theirs)


@pytest.mark.parametrize("kernel", ["sdpa", "reference"])
def test_a_windowed_stack_matches_hf_mistral_past_the_window(kernel):
    hf = make_mistral()
    ours = hybrid_from_llama(hf, kernel)
    assert ours.config.window == WINDOW
    idx = tokens(2, 4 * WINDOW + 1, seed=5)
    with torch.no_grad():
        assert_matches(ours(idx), hf(idx).logits)
    theirs = hf_greedy(hf, idx[:, :3], 4 * WINDOW)
    cache = ours.empty_cache(2)
    assert isinstance(cache.kv, SinkCache)  # Mistral's rolling buffer
    mine = ours.generate(idx[:, :3], 4 * WINDOW, cache=cache)
    assert torch.equal(mine, theirs)
    assert cache.kv.held(0) == WINDOW  # never more than the window


# --- an all-Mamba stack is a Mamba -----------------------------------------------------------

def hybrid_from_mamba(hf: torch.nn.Module) -> Hybrid:
    """An all-Mamba Hybrid without feed-forward layers, with the weights of a Hugging Face
    ``MambaForCausalLM`` (through ``Mamba.from_hf``)."""
    c, mamba = hf.config, Mamba.from_hf(hf)
    config = HybridConfig(c.vocab_size, c.hidden_size, "M" * c.num_hidden_layers,
                          d_state=c.state_size, d_conv=c.conv_kernel, expand=c.expand,
                          dt_rank=c.time_step_rank, d_ff=0, norm_eps=c.layer_norm_epsilon,
                          tie_embeddings=c.tie_word_embeddings)
    model = Hybrid(config)
    weights = {name.replace("embedding.", "embedding.token.").replace("blocks.", "layers.")
               .replace(".norm.", ".norm1."): w for name, w in mamba.state_dict().items()}
    assert model.load_state_dict(weights, strict=True)
    return model.eval()


def test_an_all_mamba_stack_matches_hf_mamba():
    config = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=24, state_size=6,
                                      conv_kernel=3, time_step_rank=4, num_hidden_layers=3,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    hf = jitter(transformers.MambaForCausalLM(config), seed=3, size=0.3)
    ours = hybrid_from_mamba(hf)
    idx = tokens(2, 17, seed=4)
    with torch.no_grad():
        theirs = hf(idx, use_cache=False).logits
        assert_matches(ours(idx), theirs, atol=2e-5)
    theirs = hf_greedy(hf, idx[:, :6], 14)
    mine = ours.generate(idx[:, :6], 14)
    assert len(set(mine[:, 6:].flatten().tolist())) > 2, "degenerate test: one token repeated"
    assert torch.equal(mine, theirs)
