"""helpers.hybrid without Hugging Face (its oracles are in tests/test_hybrid_hf.py): layouts,
linear attention against its definition written out here, parameter counts against a hand
count, the MQAR trainer and its accuracy against an exact look-up solver; then the promises
that have no outside oracle: cached pieces equal one pass, cached generation equals uncached,
memory formulas equal the bytes a real cache holds."""

from __future__ import annotations

import pytest
import torch

from helpers.hybrid import (
    Hybrid,
    HybridCache,
    HybridConfig,
    compare_mechanisms,
    count_parameters,
    decode_memory_bytes,
    jamba_layout,
    layer_plan,
    parse_layout,
    time_per_token,
    width_for_budget,
)
from helpers.kv_cache import QuantizedKVCache
from helpers.tasks import (
    IGNORE_INDEX,
    associative_recall_task,
    query_accuracy,
    train_associative_recall,
)

VOCAB = 61
WINDOW = 5
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def jitter(model: torch.nn.Module, seed: int, size: float = 0.1) -> torch.nn.Module:
    """Noise on every parameter, so that a weight loaded into the wrong place (fresh norms are
    ones, fresh A_log rows all equal) changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(size * torch.randn(p.shape, generator=g).to(p))
    return model.eval()


def tokens(batch: int, length: int, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- layouts ---------------------------------------------------------------------------------

def test_layer_plan_gives_each_layer_its_slot_among_its_kind():
    assert layer_plan("MMAM") == [("M", 0), ("M", 1), ("A", 0), ("M", 2)]
    assert layer_plan("LAMAL") == [("L", 0), ("A", 0), ("M", 0), ("A", 1), ("L", 1)]


@pytest.mark.parametrize("layout, message", [("", "non-empty"), ("MMxA", "'x' at position 2"),
                                              ("mA", "'m' at position 0"), (None, "string")])
def test_bad_layouts_are_refused_with_the_bad_character(layout, message):
    with pytest.raises(ValueError, match=message):
        parse_layout(layout)


@pytest.mark.parametrize("options, message", [
    (dict(d_model=30, n_heads=4), "divisible by n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "not divisible by n_kv_heads"),
    (dict(kernel="triton"), "kernel should be one of"),
    (dict(kernel="flash", window=4), "no sliding window"),
    (dict(window=0), "at least 1"),
    (dict(head_dim=5), "head_dim must be even"),
])
def test_bad_configs_are_refused(options, message):
    base = dict(vocab_size=VOCAB, d_model=32, layout="MA")
    with pytest.raises(ValueError, match=message):
        HybridConfig(**{**base, **options})


def test_a_cache_must_fit_the_layout():
    model = Hybrid(HybridConfig(VOCAB, 16, "MAM", n_heads=2))
    cache = model.empty_cache(1)
    with pytest.raises(ValueError, match="layout 'MAMM'"):
        HybridCache("MAMM", cache.kv, cache.mamba, cache.linear)


# --- linear attention ------------------------------------------------------------------------

def test_linear_attention_layers_compute_the_definition():
    """Katharopoulos et al. (2020): out_t = Σ_{j<=t} φ(q_t)·φ(k_j) v_j / Σ_{j<=t} φ(q_t)·φ(k_j),
    φ = elu + 1, per head, written out with explicit prefix sums."""
    torch.manual_seed(5)
    config = HybridConfig(VOCAB, 12, "L", n_heads=3, head_dim=4, d_ff=0)
    mixer = jitter(Hybrid(config), seed=6).layers[0].mixer.double()
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    B, L, H, D = 2, 9, 3, 4

    def heads(t):
        return t.view(B, L, H, D)

    q, k, v = heads(mixer.q_proj(x)), heads(mixer.k_proj(x)), heads(mixer.v_proj(x))
    phi_q, phi_k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    out = torch.empty(B, L, H, D, dtype=torch.float64)
    for t in range(L):
        scores = (phi_q[:, t, None] * phi_k[:, :t + 1]).sum(-1)  # (B, t+1, H)
        out[:, t] = (scores[..., None] * v[:, :t + 1]).sum(1) / scores.sum(1)[..., None]
    expected = mixer.out_proj(out.reshape(B, L, H * D))
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), expected)
        state = mixer.empty_state(B, dtype=torch.float64)
        pieces = torch.cat([mixer(x[:, :4], state), mixer(x[:, 4:5], state),
                            mixer(x[:, 5:], state)], dim=1)
    torch.testing.assert_close(pieces, expected)


# --- one stack of every kind: cache, generation, memory --------------------------------------

MIXED = {
    "jamba, rope, gqa": dict(layout="MMAMMMAM", n_kv_heads=1),
    "every kind, token shift": dict(layout="MALMAL", token_shift=True),
    "window, no rope": dict(layout="AMLA", window=3, rope=False, token_shift=True),
    "reference kernel, window": dict(layout="LAMA", window=4, kernel="reference"),
    "flash kernel, no mlp": dict(layout="AMA", kernel="flash", d_ff=0),
}


def mixed_model(name: str, seed: int = 0) -> Hybrid:
    torch.manual_seed(seed)
    config = HybridConfig(VOCAB, 16, **{"n_heads": 2, "d_state": 4, "d_ff": 24, **MIXED[name]})
    return jitter(Hybrid(config), seed=seed + 1).double()


@pytest.mark.parametrize("name", MIXED)
def test_forward_in_pieces_on_one_cache_equals_one_pass(name):
    model = mixed_model(name)
    idx = tokens(3, 13, seed=7)
    cache = model.empty_cache(3)
    with torch.no_grad():
        whole = model(idx)
        pieces = torch.cat([model(idx[:, a:b], cache=cache)
                            for a, b in ((0, 5), (5, 6), (6, 7), (7, 13))], dim=1)
    torch.testing.assert_close(pieces, whole)
    assert cache.seq_len == 13


@pytest.mark.parametrize("name", MIXED)
def test_cached_generation_equals_rerunning_the_whole_text(name):
    model = mixed_model(name, seed=3).float()
    prompt = tokens(2, 4, seed=8)
    cached = model.generate(prompt, 15)
    assert torch.equal(cached, model.generate(prompt, 15, use_cache=False))
    resumed_cache = model.empty_cache(2)  # a second call continues where the first stopped
    first = model.generate(prompt, 6, cache=resumed_cache)
    assert torch.equal(model.generate(first, 9, cache=resumed_cache), cached)


def test_generation_with_a_cache_that_holds_the_whole_prompt_is_refused():
    model = mixed_model("jamba, rope, gqa").float()
    cache = model.empty_cache(1)
    prompt = tokens(1, 4, seed=9)
    model(prompt, cache=cache)
    with pytest.raises(ValueError, match="already holds 4 tokens"):
        model.generate(prompt, 3, cache=cache)


def test_any_kv_cache_serves_the_attention_layers():
    """The hybrid's attention layers take any cache of helpers.kv_cache: an 8-bit KIVI cache
    whose recent tokens stay exact keeps short generations identical."""
    model = mixed_model("jamba, rope, gqa").float()
    prompt = tokens(2, 5, seed=10)
    cache = model.empty_cache(2, kv_cache=QuantizedKVCache(2, bits=8, residual=64))
    assert torch.equal(model.generate(prompt, 8, cache=cache), model.generate(prompt, 8))


@pytest.mark.parametrize("name", MIXED)
@pytest.mark.parametrize("length", [2, 11])
def test_decode_memory_formula_equals_what_a_real_cache_holds(name, length):
    model = mixed_model(name).float()
    cache = model.empty_cache(3)
    with torch.no_grad():
        model(tokens(3, length, seed=11), cache=cache)
    assert decode_memory_bytes(model.config, length, batch=3, bytes_per_elem=4) == \
        cache.nbytes_by_kind()
    assert model.decode_memory_bytes(length, batch=3) == cache.nbytes_by_kind()
    random = model.random_cache(3, length)
    assert random.nbytes_by_kind() == cache.nbytes_by_kind() and random.seq_len == length


def test_decode_memory_of_jamba_is_an_eighth_of_a_transformers_kv_cache():
    """Jamba v0.1's shapes (Lieber et al., 2024, table 1: 4 GB of KV cache at 256K tokens
    against 32 GB for Mixtral), counted from first principles in the test."""
    jamba = HybridConfig(65536, 4096, jamba_layout(32), n_heads=32, n_kv_heads=8, rope=False)
    mixtral = HybridConfig(32000, 4096, "A" * 32, n_heads=32, n_kv_heads=8)
    n = 256 * 1024
    kv_per_layer = 2 * 8 * 128 * n * 2  # keys and values, 8 heads of 128, bfloat16
    assert decode_memory_bytes(jamba, n) == {"A": 4 * kv_per_layer,
                                             "M": 28 * 8192 * (16 + 3) * 2}
    assert decode_memory_bytes(mixtral, n) == {"A": 32 * kv_per_layer}
    assert decode_memory_bytes(jamba, n)["A"] == 4 * 2**30


def test_kernels_agree_in_outputs_and_gradients():
    """The three attention kernels are one function: same logits, same parameter gradients."""
    idx = tokens(2, 150, seed=12)  # longer than one FlashAttention tile
    grads = {}
    for kernel in ("sdpa", "reference", "flash"):
        torch.manual_seed(13)
        model = Hybrid(HybridConfig(VOCAB, 16, "AMA", n_heads=2, n_kv_heads=1, d_state=4,
                                    kernel=kernel)).double()
        logits = model(idx)
        logits.square().mean().backward()
        grads[kernel] = (logits.detach(), [p.grad for p in model.parameters()])
    for kernel in ("reference", "flash"):
        torch.testing.assert_close(grads[kernel][0], grads["sdpa"][0])
        for got, expected in zip(grads[kernel][1], grads["sdpa"][1]):
            torch.testing.assert_close(got, expected)


# --- fair comparisons ------------------------------------------------------------------------

def test_count_parameters_counts_a_tied_weight_once_and_skips_frozen_ones():
    model = Hybrid(HybridConfig(VOCAB, 16, "A", n_heads=2, d_ff=0, rope=False))
    # embedding (tied head) + 4 projections + 2 norms
    assert count_parameters(model) == VOCAB * 16 + 4 * 16 * 16 + 2 * 16
    model.layers[0].mixer.requires_grad_(False)
    assert count_parameters(model) == VOCAB * 16 + 2 * 16


def test_width_for_budget_takes_the_largest_width_that_fits():
    def build(width):
        return torch.nn.Linear(width, width)  # width² + width parameters

    assert width_for_budget(build, 20 * 20 + 20, [24, 8, 20, 16]) == 20
    assert width_for_budget(build, 20 * 20 + 19, iter([24, 8, 20, 16])) == 16
    with pytest.raises(ValueError, match="no width"):
        width_for_budget(build, 10, [8, 16])


def test_time_per_token_takes_the_median_of_interleaved_rounds_per_token():
    now, log = [0.0], []
    durations = {"a": [100.0, 1.0, 50.0, 3.0], "b": [100.0, 2.0, 2.0, 90.0]}

    def fn(name):
        def run():
            log.append(name)
            now[0] += durations[name].pop(0)
        return run

    result = time_per_token({"a": fn("a"), "b": fn("b")}, n_tokens=2, repeats=3, warmup=1,
                            clock=lambda: now[0])
    assert log == ["a", "b"] * 4
    assert result == {"a": 3.0 / 2, "b": 2.0 / 2}


def test_compare_mechanisms_measures_every_model_at_every_context():
    models = {layout: Hybrid(HybridConfig(VOCAB, 16, layout, n_heads=2, d_state=4, d_ff=0,
                                          window=window)).eval()
              for layout, window in (("AA", None), ("MM", None), ("LA", 8))}
    threads = torch.get_num_threads()
    rows = compare_mechanisms(models, [4, 20], prefill_contexts=[6], repeats=1)
    assert torch.get_num_threads() == threads  # one thread while measuring, then restored
    assert {(row.mechanism, row.context) for row in rows} == {
        (name, n) for name in models for n in (4, 6, 20)}
    for row in rows:
        prefilled, decoded = row.context == 6, row.context != 6
        assert (row.prefill_s is not None) == prefilled == (row.prefill_bytes is not None)
        assert (row.decode_s is not None) == decoded
        if decoded:
            model = models[row.mechanism]
            assert row.cache_bytes == sum(model.decode_memory_bytes(row.context).values())


class LookUp(torch.nn.Module):
    """Solves MQAR exactly, written out in the test: at each token, the token that followed
    its first earlier occurrence (one-hot logits); a parameter of weight 0 lets Adam run."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.unused = vocab, torch.nn.Parameter(torch.zeros(()))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, L = idx.shape
        earlier = torch.ones(L, L, dtype=torch.bool).tril(-1)  # j < t
        match = (idx[:, :, None] == idx[:, None, :]) & earlier  # (B, t, j)
        first = match.int().argmax(dim=-1).clamp(max=L - 2)  # (B, L)
        answer = idx.gather(1, first + 1)  # (B, L)
        return torch.nn.functional.one_hot(answer, self.vocab).float() + 0 * self.unused


def test_recall_training_and_accuracy_score_exactly_the_queries():
    vocab, pairs = 24, 5
    test = associative_recall_task(64, pairs, vocab, generator=torch.Generator().manual_seed(4))
    assert query_accuracy(LookUp(vocab), *test) == 1.0
    curve = train_associative_recall(LookUp(vocab), pairs, vocab, steps=6, batch=8,
                                     generator=torch.Generator().manual_seed(5), test=test,
                                     test_every=2)
    assert curve == [1.0, 1.0, 1.0]  # after steps 2 and 4, and after the last
    tokens, targets = test
    wrong = targets.clone()
    asked = wrong != IGNORE_INDEX
    wrong[asked.nonzero()[::2].unbind(1)] = 0  # every other query's answer changed
    assert query_accuracy(LookUp(vocab), tokens, wrong) == pytest.approx(
        1 - (asked.sum().item() + 1) // 2 / asked.sum().item())


def test_a_small_hybrid_learns_some_recall_in_a_few_steps():
    torch.manual_seed(6)
    model = Hybrid(HybridConfig(32, 32, "AM", n_heads=1, d_state=4, d_ff=0, token_shift=True))
    curve = train_associative_recall(model, 3, 32, steps=60, batch=32, lr=1e-2,
                                     generator=torch.Generator().manual_seed(7))
    assert len(curve) == 1 and curve[0] > 0.5  # chance is 1/16


@cuda
def test_hybrid_runs_on_cuda_and_matches_the_cpu():
    model = mixed_model("every kind, token shift").float()
    prompt = tokens(2, 6, seed=14)
    on_gpu = model.cuda()
    tokens_gpu = on_gpu.generate(prompt.cuda(), 8)
    assert tokens_gpu.device.type == "cuda"
    assert torch.equal(tokens_gpu.cpu(), model.cpu().generate(prompt, 8))
