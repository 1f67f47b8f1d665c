"""Lesson 09's visible checks and hidden tests: they accept the reference solution, reject the
typical wrong answers (the visible check naming the mistake) and the shortcuts, and cannot be
fooled by a patched kernel."""

from __future__ import annotations

import math

import numpy
import pytest
import torch
import torch.nn.functional as F

import helpers.kv_cache
from helpers import kv_cache as reference
from helpers.attention import merge_heads, split_heads
from helpers.checks import CheckFailed
from helpers.checks import lesson09 as checks
from helpers.hidden import lesson
from helpers.kv_cache import KVCache
from helpers.transformer import attention as reference_attention

from conftest import expect_hidden_failure

LESSON = "09"

EXERCISES = {  # exercise -> the answer names it takes
    "decode_attention": ["decode_attention"],
    "growing_kv": ["GrowingKV"],
    "generate_greedy": ["generate_greedy"],
    "quantize": ["quantize", "dequantize"],
    "sink_window": ["sink_window"],
    "heavy_hitters": ["heavy_hitters"],
}


def run_visible(name: str, *answers) -> None:
    getattr(checks, name)(*answers)


def run_hidden(hidden, name: str, *answers) -> None:
    getattr(hidden, name)(*answers)


@pytest.mark.parametrize("name", list(EXERCISES))
def test_solution_passes_visible_and_hidden(solution, hidden, name, capsys):
    answers = [solution[n] for n in EXERCISES[name]]
    run_visible(name, *answers)
    assert "all checks passed" in capsys.readouterr().out
    for _ in range(3):  # fresh seeds, shapes and dtypes each time
        run_hidden(hidden, name, *answers)


# --- wrong answers: each is a mistake a student makes; each fails both kinds of check --------

def _decode(attn, x, past_k, past_v, *, order="append", scale=True, mask=None, project=True,
            keep_new=True):
    q = split_heads(attn.q_proj(x), attn.n_heads)
    k_new = split_heads(attn.k_proj(x), attn.n_heads)
    v_new = split_heads(attn.v_proj(x), attn.n_heads)
    if order == "append":
        k, v = torch.cat([past_k, k_new], dim=2), torch.cat([past_v, v_new], dim=2)
    else:
        k, v = torch.cat([k_new, past_k], dim=2), torch.cat([v_new, past_v], dim=2)
    attend_k, attend_v = (k, v) if keep_new else (past_k, past_v)
    if attend_k.shape[2] == 0:
        attend_k, attend_v = k, v
    out = F.scaled_dot_product_attention(q, attend_k, attend_v, scale=None if scale else 1.0,
                                         is_causal=mask == "top-left")
    out = merge_heads(out)
    return (attn.out_proj(out) if project else out), k, v


WRONG_DECODES = {
    "past only": (lambda *a: _decode(*a, keep_new=False), "attend to itself"),
    "is_causal top left": (lambda *a: _decode(*a, mask="top-left"), "is_causal=True"),
    "unscaled": (lambda *a: _decode(*a, scale=False), "√D"),
    "no out_proj": (lambda *a: _decode(*a, project=False), "out_proj"),
    "new key first": (lambda *a: _decode(*a, order="prepend"), "new key comes first"),
    "new keys only": (lambda *a: (_decode(*a)[0], *[t[:, :, -1:] for t in _decode(*a)[1:]]),
                      "only the new token"),
}


class CatKV:
    """torch.cat at every append: a copy of the past each time."""

    def __init__(self, capacity: int = 4):
        self.length, self.k, self.v = 0, None, None

    def append(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        self.length = self.k.shape[2]
        return self.k, self.v


class FixedStepKV:
    """Preallocated, but grows by a fixed number of slots: still O(n²) copies."""

    step = 16

    def __init__(self, capacity: int = 4):
        self.capacity, self.length, self.k, self.v = capacity, 0, None, None

    def _grow(self, end: int) -> int:
        capacity = self.capacity if self.k is None else self.k.shape[2]
        while capacity < end:
            capacity += self.step
        return capacity

    def append(self, k, v):
        end = self.length + k.shape[2]
        if self.k is None or end > self.k.shape[2]:
            capacity = self._grow(end)
            new_k = k.new_empty(*k.shape[:2], capacity, k.shape[3])
            new_v = v.new_empty(*v.shape[:2], capacity, v.shape[3])
            if self.k is not None:
                new_k[:, :, :self.length], new_v[:, :, :self.length] = self.k[:, :, :self.length], self.v[:, :, :self.length]
            self.k, self.v = new_k, new_v
        self.k[:, :, self.length:end], self.v[:, :, self.length:end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class ExactKV(FixedStepKV):
    """Reallocates to exactly the length needed at every append."""

    def _grow(self, end: int) -> int:
        return end


class CloningKV(FixedStepKV):
    """Doubles properly but returns copies, not views of the storage."""

    def _grow(self, end: int) -> int:
        capacity = self.capacity if self.k is None else self.k.shape[2]
        while capacity < end:
            capacity *= 2
        return capacity

    def append(self, k, v):
        k_all, v_all = super().append(k, v)
        return k_all.clone(), v_all.clone()


class ForgetfulKV(CloningKV):
    """Doubles, but does not copy the past into the new storage."""

    def append(self, k, v):
        end = self.length + k.shape[2]
        if self.k is not None and end > self.k.shape[2]:
            self.k = self.k.new_zeros(*self.k.shape[:2], self._grow(end), self.k.shape[3])
            self.v = self.v.new_zeros(*self.v.shape[:2], self.k.shape[2], self.v.shape[3])
        return FixedStepKV.append(self, k, v)


WRONG_CACHES = {CatKV: "every append makes a new tensor", ExactKV: "every append makes",
                FixedStepKV: "grow geometrically", CloningKV: "every append makes",
                ForgetfulKV: "copy the old contents"}


def _greedy(model, idx, steps, *, prompt_at_once=True, use_cache=True):
    cache = KVCache(len(model.blocks)) if use_cache else None
    with torch.no_grad():
        if prompt_at_once or not use_cache:
            logits = model(idx, cache=cache)[:, -1]
        else:
            for t in range(idx.shape[1]):
                logits = model(idx[:, t:t + 1], cache=cache)[:, -1]
        out = idx
        for _ in range(steps):
            token = logits.argmax(-1, keepdim=True)
            out = torch.cat([out, token], dim=1)
            logits = model(token if use_cache else out, cache=cache)[:, -1]
    return out


def greedy_refeeding_everything(model, idx, steps):
    """Feeds the whole sequence into the cache at every step: the cache holds it many times."""
    cache = KVCache(len(model.blocks))
    with torch.no_grad():
        out = idx
        for _ in range(steps):
            logits = model(out[:, -1:] if cache.seq_len else out, cache=cache)[:, -1]
            out = torch.cat([out, logits.argmin(-1, keepdim=True)], dim=1)
    return out


WRONG_GENERATIONS = {
    "no cache": (lambda m, i, n: _greedy(m, i, n, use_cache=False), "had no cache"),
    "prompt one token at a time": (lambda m, i, n: _greedy(m, i, n, prompt_at_once=False),
                                   "feed the whole prompt once"),
    "argmin": (greedy_refeeding_everything, "tokens differ"),
}


def _quantizer(levels=lambda bits: 2**bits - 1, rounding=torch.round, symmetric=False,
               per_tensor=False, fixed_bits=None):
    def quantize(x, dim, bits=8):
        bits = fixed_bits or bits
        wide = x.double()
        reduce = (lambda t, f: getattr(t, f)()) if per_tensor else \
            (lambda t, f: getattr(t, f)(dim=dim, keepdim=True))
        high = reduce(wide, "amax")
        low = -reduce(wide.abs(), "amax") if symmetric else reduce(wide, "amin")
        if symmetric:
            high = -low
        scale = (high - low) / levels(bits)
        divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = rounding((wide - low) / divisor).clamp(0, 2**bits - 1).to(torch.uint8)
        return codes, scale.to(x.dtype), low.to(x.dtype)
    return quantize


def dequantize(codes, scale, zero):
    return codes.to(scale.dtype) * scale + zero


WRONG_QUANTIZERS = {
    "2^bits levels": (_quantizer(levels=lambda bits: 2**bits), r"2\^bits - 1 steps"),
    "floor": (_quantizer(rounding=torch.floor), "do not truncate"),
    "symmetric": (_quantizer(symmetric=True), "symmetric"),
    "per tensor": (_quantizer(per_tensor=True), "one scale for the whole tensor"),
    "always 8 bits": (_quantizer(fixed_bits=8), "use the argument bits"),
}


def dequantize_without_zero(codes, scale, zero):
    return codes.to(scale.dtype) * scale


def _sink(k, v, window, n_sinks, *, dedupe=True, order="sinks first", off_by_one=0,
          trim_values=True):
    S = k.shape[2]
    if dedupe and S <= n_sinks + window:
        return k, v
    sinks = torch.arange(min(n_sinks, S))
    recent = torch.arange(max(S - window - off_by_one, 0), S - off_by_one)
    keep = torch.cat([sinks, recent] if order == "sinks first" else [recent, sinks])
    return k[:, :, keep], (v[:, :, keep] if trim_values else v)


WRONG_SINKS = {
    "duplicates": (lambda *a: _sink(*a, dedupe=False), "kept twice"),
    "window first": (lambda *a: _sink(*a, order="window first"), "wrong order"),
    "off by one": (lambda *a: _sink(*a, off_by_one=1), "kept positions"),
    "values untouched": (lambda *a: _sink(*a, trim_values=False), "same tokens as the keys"),
}


def _heavy(scores, budget, n_recent, *, sort=True, force_recent=True, values=False):
    B, H, S = scores.shape
    if S <= budget:
        kept = torch.arange(S).expand(B, H, S)
    elif force_recent:
        older = scores[..., :S - n_recent].topk(budget - n_recent, dim=-1).indices
        kept = torch.cat([older, torch.arange(S - n_recent, S).expand(B, H, n_recent)], -1)
    else:
        kept = scores.topk(budget, dim=-1).indices
    kept = kept.sort(dim=-1).values if sort else kept
    return scores.gather(-1, kept) if values else kept


def heavy_with_duplicates(scores, budget, n_recent):
    B, H, S = scores.shape
    if S <= budget:
        return torch.arange(S).expand(B, H, S)
    top = scores.topk(budget - n_recent, dim=-1).indices
    return torch.cat([top, torch.arange(S - n_recent, S).expand(B, H, n_recent)], -1).sort(-1).values


WRONG_HEAVY = {
    "unsorted": (lambda *a: _heavy(*a, sort=False), "wrong order"),
    "recent not forced": (lambda *a: _heavy(*a, force_recent=False), "must always be kept"),
    "duplicates": (heavy_with_duplicates, "appears twice"),
    "scores not indices": (lambda *a: _heavy(*a, values=True), "not the scores"),
}


def _wrong_answers(solution) -> dict[str, list[tuple[tuple, str]]]:
    """exercise -> [(answers, the visible message that names the mistake)]."""
    return {
        "decode_attention": [((wrong,), hint) for wrong, hint in WRONG_DECODES.values()],
        "growing_kv": [((wrong,), hint) for wrong, hint in WRONG_CACHES.items()],
        "generate_greedy": [((wrong,), hint) for wrong, hint in WRONG_GENERATIONS.values()],
        "quantize": [((wrong, dequantize), hint) for wrong, hint in WRONG_QUANTIZERS.values()]
                    + [((solution["quantize"], dequantize_without_zero), "codes \\* scale \\+ zero")],
        "sink_window": [((wrong,), hint) for wrong, hint in WRONG_SINKS.values()],
        "heavy_hitters": [((wrong,), hint) for wrong, hint in WRONG_HEAVY.values()],
    }


@pytest.mark.parametrize("name", list(EXERCISES))
def test_wrong_answers_fail_with_the_message_that_names_them(solution, hidden, name):
    for answers, hint in _wrong_answers(solution)[name]:
        with pytest.raises(CheckFailed, match=hint):
            run_visible(name, *answers)
        expect_hidden_failure(lambda: run_hidden(hidden, name, *answers))


def test_wrong_answers_fail_hidden_on_every_draw(solution, hidden):
    """Each hidden test draws fresh sizes: a wrong answer must fail on every draw."""
    for name, cases in _wrong_answers(solution).items():
        for answers, _ in cases:
            for _ in range(5):
                expect_hidden_failure(lambda: run_hidden(hidden, name, *answers))


# --- shortcuts: right numbers, but through the reference -------------------------------------

def decode_through_the_reference(attn, x, past_k, past_v):
    cache = KVCache(1)
    cache.update(0, past_k, past_v)
    out = reference_attention(attn, x, cache=cache)
    return out, *cache.stored(0).values()


class ReferenceKV:
    def __init__(self, capacity: int = 4):
        self.cache, self.length = KVCache(1, capacity), 0

    def append(self, k, v):
        self.length += k.shape[2]
        return self.cache.update(0, k, v)


def generate_through_generate(model, idx, steps):
    return model.generate(idx, steps)


def sink_through_the_reference(k, v, window, n_sinks):
    keep = reference.sink_window_keep(torch.arange(k.shape[2]), window, n_sinks)
    return k[:, :, keep], v[:, :, keep]


def heavy_through_the_reference(scores, budget, n_recent):
    positions = torch.arange(scores.shape[-1]).expand_as(scores)
    return reference.heavy_hitter_keep(scores, positions, budget, n_recent)


SHORTCUTS = [
    ("decode_attention", (decode_through_the_reference,)),
    ("growing_kv", (ReferenceKV,)),
    ("generate_greedy", (generate_through_generate,)),
    ("quantize", (reference.quantize, reference.dequantize)),
    ("sink_window", (sink_through_the_reference,)),
    ("heavy_hitters", (heavy_through_the_reference,)),
]


@pytest.mark.parametrize("name, answers", SHORTCUTS, ids=[name for name, _ in SHORTCUTS])
def test_shortcuts_fail_hidden(hidden, name, answers):
    expect_hidden_failure(lambda: run_hidden(hidden, name, *answers), "ShortcutUsed")


# --- a student cell that patched the kernel cannot change a hidden verdict --------------------

def test_hidden_verdicts_survive_a_patched_kernel(monkeypatch, solution):
    wrong = WRONG_QUANTIZERS["floor"][0]
    monkeypatch.setattr(torch, "allclose", lambda *args, **kwargs: True)
    monkeypatch.setattr(numpy, "allclose", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.testing, "assert_close", lambda *args, **kwargs: None)
    monkeypatch.setattr(helpers.kv_cache, "quantize", wrong)
    monkeypatch.setattr(helpers.kv_cache, "heavy_hitter_keep", lambda *args: None)
    hidden = lesson(LESSON)  # loaded after the patches, as the hidden test cell does
    expect_hidden_failure(lambda: hidden.quantize(wrong, dequantize))
    hidden.quantize(solution["quantize"], solution["dequantize"])
    hidden.heavy_hitters(solution["heavy_hitters"])
    expect_hidden_failure(lambda: hidden.heavy_hitters(WRONG_HEAVY["unsorted"][0]))


def test_not_started_exercises_say_so():
    def stub(*args, **kwargs):
        raise NotImplementedError()

    class Stub:
        def __init__(self, capacity: int = 4):
            raise NotImplementedError()

    for name, answers in EXERCISES.items():
        stubs = [Stub if answer == "GrowingKV" else stub for answer in answers]
        with pytest.raises(CheckFailed, match="not done yet"):
            run_visible(name, *stubs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_solution_runs_on_cuda(solution):
    x = torch.randn(2, 3, 40, 8, device="cuda")
    codes, scale, zero = solution["quantize"](x, dim=-2, bits=4)
    assert codes.device.type == "cuda"
    error = (solution["dequantize"](codes, scale, zero) - x).abs()
    assert bool((error <= scale / 2 + 1e-6).all())
    cache = solution["GrowingKV"](capacity=2)
    k_all, _ = cache.append(x, x)
    assert k_all.device.type == "cuda" and math.isclose(float(k_all.sum()), float(x.sum()),
                                                         rel_tol=1e-5)
    kept = solution["heavy_hitters"](x[..., 0], 10, 3)
    assert kept.device.type == "cuda" and kept.shape == (2, 3, 10)
