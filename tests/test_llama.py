"""The course's Llama against Hugging Face's ``LlamaForCausalLM`` and ``MistralForCausalLM``,
an oracle nobody here wrote: small random configs built offline, weights loaded with
``Llama.from_hf``, then logits and greedy tokens compared, for GQA, MQA, a head_dim that is
not d_model / n_heads, a RoPE base, biases, tied embeddings and Mistral's sliding window; and
helpers.rope against Hugging Face's own RoPE."""

from __future__ import annotations

import pytest
import torch

try:  # part of the test extra: CI must never silently lose its external references
    import transformers
    from transformers.models.llama import modeling_llama
except ImportError as error:
    raise ImportError("the oracle tests need Hugging Face transformers, part of the test extra: "
                      "pip install -e '.[test]'") from error

from helpers.kv_cache import KVCache  # noqa: E402
from helpers.rope import apply_rope, rope, rope_cos_sin  # noqa: E402
from helpers.transformer import Llama  # noqa: E402

VOCAB = 97
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, bos_token_id=None, eos_token_id=None, pad_token_id=None,
             initializer_range=0.2)
LLAMAS = {
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "mha, head_dim 12, rope_theta 5e5": dict(num_key_value_heads=4, head_dim=12,
                                             rope_theta=500000.0),
    "biases": dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    "tied embeddings": dict(num_key_value_heads=2, tie_word_embeddings=True),
}
WINDOW = 5


def jitter(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Add noise to every parameter, so that a norm or a bias loaded into the wrong place
    (fresh norms are all ones, fresh biases all zeros) changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(p))
    return model.eval()


def make_llama(options: dict, attn: str = "eager") -> torch.nn.Module:
    config = transformers.LlamaConfig(**SMALL, **options, attn_implementation=attn)
    torch.manual_seed(0)
    return jitter(transformers.LlamaForCausalLM(config), seed=1)


def make_mistral(attn: str = "eager") -> torch.nn.Module:
    config = transformers.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=WINDOW,
                                        attn_implementation=attn)
    torch.manual_seed(0)
    return jitter(transformers.MistralForCausalLM(config), seed=2)


@pytest.mark.parametrize("head_dim, base", [(8, 10000.0), (12, 500000.0), (64, 10000.0)])
def test_rope_matches_hugging_face(head_dim, base):
    config = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4,
                                      head_dim=head_dim, rope_theta=base)
    rotary = modeling_llama.LlamaRotaryEmbedding(config)
    g = torch.Generator().manual_seed(head_dim)
    q, k = torch.randn(2, 2, 4, 9, head_dim, generator=g)  # (B, H, L, D) each
    positions = torch.tensor([0, 1, 2, 5, 17, 100, 1000, 4095, 30000])
    cos, sin = rotary(q, positions[None])  # (1, L, D)
    q_hf, k_hf = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(rope(q, positions, base), q_hf, atol=1e-5, rtol=1e-5)
    ours_cos, ours_sin = rope_cos_sin(positions, head_dim, base)
    torch.testing.assert_close(apply_rope(k, ours_cos, ours_sin), k_hf, atol=1e-5, rtol=1e-5)


def assert_matches(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """float32 agreement, relative to the size of the outputs."""
    scale = float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs, atol=1e-5 * max(scale, 1.0), rtol=1e-5)


def tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_greedy(hf: torch.nn.Module, idx: torch.Tensor, new: int) -> torch.Tensor:
    return hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new,
                       do_sample=False)


@pytest.mark.parametrize("name", LLAMAS)
def test_llama_logits_match_hf(name):
    hf = make_llama(LLAMAS[name])
    ours = Llama.from_hf(hf)
    idx = tokens(3, 11, seed=3)
    with torch.no_grad():
        assert_matches(ours(idx), hf(idx).logits)


def test_from_hf_reads_the_config():
    hf = make_llama(LLAMAS["mha, head_dim 12, rope_theta 5e5"])
    ours = Llama.from_hf(hf)
    assert ours.head_dim == 12 and ours.rope_base == 500000.0
    assert ours.blocks[0].attn.q_proj.out_features == 4 * 12
    tied = Llama.from_hf(make_llama(LLAMAS["tied embeddings"]))
    assert tied.lm_head.weight is tied.token_embedding.weight
    untied = Llama.from_hf(make_llama(LLAMAS["gqa"]))
    assert untied.lm_head.weight is not untied.token_embedding.weight
    assert Llama.from_hf(make_llama(LLAMAS["mqa"])).blocks[1].attn.n_kv_heads == 1


@pytest.mark.parametrize("name", ["gqa", "mqa", "biases"])
def test_llama_greedy_generation_matches_hf(name):
    hf = make_llama(LLAMAS[name])
    ours = Llama.from_hf(hf)
    idx = tokens(2, 5, seed=4)
    theirs = hf_greedy(hf, idx, 16)
    mine = ours.generate(idx, 16)
    assert len(set(mine[:, 5:].flatten().tolist())) > 3, "degenerate test: one token repeated"
    assert torch.equal(mine, theirs)
    assert torch.equal(ours.generate(idx, 16, use_cache=False), theirs)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_mistral_logits_match_hf_with_a_window_shorter_than_the_sequence(attn):
    hf = make_mistral(attn)
    ours = Llama.from_hf(hf)
    assert ours.window == WINDOW
    idx = tokens(2, 4 * WINDOW + 1, seed=5)
    with torch.no_grad():
        theirs = hf(idx).logits
        assert_matches(ours(idx), theirs)
        full = Llama.from_hf(hf)
        for block in full.blocks:
            block.window = None
        late = slice(WINDOW, None)  # the window changes only positions past it
        assert (full(idx)[:, late] - theirs[:, late]).abs().max() > 1e-3


@pytest.mark.parametrize("prompt", [3, 2 * WINDOW + 1])
def test_mistral_greedy_generation_past_the_window_matches_hf(prompt):
    hf = make_mistral()
    ours = Llama.from_hf(hf)
    idx = tokens(2, prompt, seed=6)
    theirs = hf_greedy(hf, idx, 4 * WINDOW)
    mine = ours.generate(idx, 4 * WINDOW)
    assert len(set(mine[:, prompt:].flatten().tolist())) > 3, "degenerate test"
    assert torch.equal(mine, theirs)
    assert torch.equal(ours.generate(idx, 4 * WINDOW, use_cache=False), theirs)


class RollingCache:
    """A test double with the course's cache interface that keeps only the last
    ``window - 1`` keys of each layer, as Hugging Face's sliding-window cache does: the model
    must take positions from ``seq_len`` and the number of keys from what ``update`` returns."""

    def __init__(self, n_layers: int, window: int):
        self.keep, self.seen = window - 1, [0] * n_layers
        self.k: list = [None] * n_layers
        self.v: list = [None] * n_layers

    def update(self, layer, k, v):
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        self.seen[layer] += k.shape[2] - (0 if self.k[layer] is None else self.k[layer].shape[2])
        self.k[layer], self.v[layer] = k[:, :, -self.keep:], v[:, :, -self.keep:]
        return k, v

    def held(self, layer=0):
        return 0 if self.k[layer] is None else self.k[layer].shape[2]

    @property
    def seq_len(self):
        return self.seen[0]


def test_generation_with_a_cache_that_evicts_past_the_window():
    hf = make_mistral()
    ours = Llama.from_hf(hf)
    idx = tokens(2, 7, seed=7)
    cache = RollingCache(len(ours.blocks), WINDOW)
    mine = ours.generate(idx, 3 * WINDOW, cache=cache)
    assert cache.held(0) == WINDOW - 1 and cache.seq_len == 7 + 3 * WINDOW - 1
    assert torch.equal(mine, hf_greedy(hf, idx, 3 * WINDOW))


def test_keys_are_cached_rotated():
    """The cache holds RoPE'd keys: a forward over a prompt equals the same forward split in
    two through the cache (the second half's keys are rotated at their own positions)."""
    ours = Llama.from_hf(make_llama(LLAMAS["gqa"]))
    idx = tokens(2, 9, seed=8)
    cache = KVCache(len(ours.blocks))
    with torch.no_grad():
        first, second = ours(idx[:, :4], cache=cache), ours(idx[:, 4:], cache=cache)
        assert_matches(torch.cat([first, second], dim=1), ours(idx))


@pytest.mark.parametrize("config, message", [
    (transformers.LlamaConfig(**SMALL, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                        "rope_theta": 10000.0}), "RoPE"),
    (transformers.LlamaConfig(**SMALL, hidden_act="tanh"), "activation"),
])
def test_unsupported_configs_raise(config, message):
    with pytest.raises(ValueError, match=message):
        Llama.from_hf(transformers.LlamaForCausalLM(config))


def test_other_models_are_refused():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=16,
                                                                n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="LlamaForCausalLM and MistralForCausalLM"):
        Llama.from_hf(gpt2)


@cuda
def test_mistral_on_cuda_matches_hf():
    hf = make_mistral().to("cuda")
    ours = Llama.from_hf(hf)
    assert ours.lm_head.weight.device.type == "cuda"
    idx = tokens(2, 3 * WINDOW, seed=9).cuda()
    with torch.no_grad():
        assert_matches(ours(idx), hf(idx).logits)
    assert torch.equal(ours.generate(idx, 2 * WINDOW), hf_greedy(hf, idx, 2 * WINDOW))
