"""Lesson 11's visible checks and hidden tests: they accept the reference solution, reject the
typical wrong answers (the visible check naming the mistake) and the shortcuts, and cannot be
fooled by a patched kernel."""

from __future__ import annotations

import statistics
import time

import numpy
import pytest
import torch

import helpers.hybrid
from helpers import hybrid as reference
from helpers.checks import CheckFailed
from helpers.checks import lesson11 as checks
from helpers.hidden import lesson

from conftest import expect_hidden_failure

LESSON = "11"
EXERCISES = ["layer_plan", "hybrid_forward", "generate", "decode_memory_bytes",
             "width_for_budget", "time_per_token"]


@pytest.mark.parametrize("name", EXERCISES)
def test_solution_passes_visible_and_hidden(solution, hidden, name, capsys):
    getattr(checks, name)(solution[name])
    assert "all checks passed" in capsys.readouterr().out
    for _ in range(3):  # fresh seeds, layouts and dtypes each time
        getattr(hidden, name)(solution[name])


# --- wrong answers: each is a mistake a student makes; each must fail both kinds of check, the
# --- visible one with the message that names it

def _plan(mistake: str):
    def layer_plan(layout):
        if mistake != "no_empty_check" and not layout:
            raise ValueError("empty layout")
        if mistake == "lower_case":
            layout = layout.upper()
        seen, plan = {"A": 0, "L": 0, "M": 0}, []
        for i, kind in enumerate(layout):
            if kind not in seen:
                raise ValueError("bad layout" if mistake == "vague" else
                                 f"{kind!r} at position {i}")
            plan.append((kind, {"global": i, "from_one": seen[kind] + 1}.get(mistake,
                                                                             seen[kind])))
            seen[kind] += 1
        return plan
    layer_plan.__name__ = f"layer_plan_{mistake}"
    return layer_plan


def _forward(mistake: str):
    def hybrid_forward(model, idx, cache=None):
        start = 0 if cache is None or mistake == "positions_restart" else cache.seq_len
        positions = torch.arange(start, start + idx.shape[1], device=idx.device)
        x = model.embedding(idx, None if mistake == "embedding_without_cache" else cache)
        plan = reference.layer_plan(model.layout)
        for i, (layer, (_, slot)) in enumerate(zip(model.layers, plan)):
            if mistake == "layers_without_cache":
                x = layer(x, positions)
            else:
                x = layer(x, positions, cache, i if mistake == "global_slot" else slot)
        if cache is not None and mistake != "seq_len_not_advanced":
            cache.seq_len += idx.shape[1]
        return model.lm_head(x if mistake == "no_final_norm" else model.norm(x))
    hybrid_forward.__name__ = f"hybrid_forward_{mistake}"
    return hybrid_forward


def _generate(mistake: str):
    @torch.no_grad()
    def generate(model, prompt, max_new_tokens):
        cache = model.empty_cache(prompt.shape[0])
        tokens, fresh = prompt, prompt
        for _ in range(max_new_tokens - (mistake == "one_short")):
            if mistake == "no_cache":
                logits = model(tokens)
            elif mistake == "whole_text_each_step":
                logits = model(tokens, cache=cache)
            else:
                logits = model(fresh, cache=cache)
            position = 0 if mistake == "first_position" else -1
            fresh = logits[:, position].argmax(dim=-1, keepdim=True)
            tokens = torch.cat([tokens, fresh], dim=1)
        return tokens[:, prompt.shape[1]:] if mistake == "new_tokens_only" else tokens
    generate.__name__ = f"generate_{mistake}"
    return generate


def _memory(mistake: str):
    def decode_memory_bytes(config, seq_len, batch=1, bytes_per_elem=2):
        c = config
        kept = seq_len if c.window is None or mistake == "window_ignored" else (
            c.window if mistake == "window_without_min" else min(seq_len, c.window))
        kv_heads = c.n_heads if mistake == "query_heads" else c.n_kv_heads
        per_layer = {"A": (1 if mistake == "keys_only" else 2) * kv_heads * c.head_dim * kept,
                     "L": c.n_heads * (c.head_dim ** 2 + (0 if mistake == "no_k_sum"
                                                           else c.head_dim)),
                     "M": (c.d_model if mistake == "d_model" else c.d_inner)
                     * (c.d_state + c.d_conv - (0 if mistake == "whole_conv" else 1))}
        batch = 1 if mistake == "no_batch" else batch
        size = 1 if mistake == "no_bytes" else bytes_per_elem
        return {kind: c.layout.count(kind) * per_layer[kind] * batch * size
                for kind in "ALM" if kind in c.layout or mistake == "every_kind"}
    decode_memory_bytes.__name__ = f"decode_memory_bytes_{mistake}"
    return decode_memory_bytes


def _width(mistake: str):
    def width_for_budget(build, budget, widths):
        def count(width):
            model = build(width)
            if mistake == "state_dict":
                return sum(t.numel() for t in model.state_dict().values())
            return sum(p.numel() for p in model.parameters()
                       if p.requires_grad or mistake == "frozen")

        widths = list(widths)
        if mistake == "first_fit":
            return next(w for w in widths if count(w) <= budget)
        if mistake == "closest":
            return min(widths, key=lambda w: abs(count(w) - budget))
        fitting = [w for w in widths if count(w) <= budget]
        if mistake == "no_error" and not fitting:
            return None
        return max(fitting)
    width_for_budget.__name__ = f"width_for_budget_{mistake}"
    return width_for_budget


def _timer(mistake: str):
    def time_per_token(fns, n_tokens, repeats=5, warmup=1, sync=None, clock=time.perf_counter):
        sync = sync if sync is not None and mistake != "no_sync" else (lambda: None)
        for _ in range(0 if mistake == "no_warmup" else warmup):
            for fn in fns.values():
                fn()
        seconds = {name: [] for name in fns}
        if mistake == "not_interleaved":
            rounds = [(name, fn) for name, fn in fns.items() for _ in range(repeats)]
        else:
            rounds = [(name, fn) for _ in range(repeats) for name, fn in fns.items()]
        for name, fn in rounds:
            sync()
            start = clock()
            fn()
            sync()
            seconds[name].append(clock() - start)
        average = statistics.mean if mistake == "mean" else statistics.median
        per = 1 if mistake == "per_call" else n_tokens
        return {name: average(times) / per for name, times in seconds.items()}
    time_per_token.__name__ = f"time_per_token_{mistake}"
    return time_per_token


WRONG = {
    "layer_plan": [(_plan("global"), "index in the whole stack"), (_plan("from_one"), "from 0"),
                   (_plan("lower_case"), "lower case"), (_plan("vague"), "name the bad"),
                   (_plan("no_empty_check"), "a model needs layers")],
    "hybrid_forward": [(_forward("positions_restart"), "restart at 0"),
                       (_forward("seq_len_not_advanced"), "advance it by L"),
                       (_forward("global_slot"), "its slot"),
                       (_forward("embedding_without_cache"), "model.embedding\\(idx, cache\\)"),
                       (_forward("layers_without_cache"), "did not fill the KV cache"),
                       (_forward("no_final_norm"), "skip the final norm")],
    "generate": [(_generate("no_cache"), "once, with the cache"),
                 (_generate("whole_text_each_step"), "feed only the new one"),
                 (_generate("one_short"), "followed by the new tokens"),
                 (_generate("new_tokens_only"), "followed by the new tokens"),
                 (_generate("first_position"), "last position")],
    "decode_memory_bytes": [(_memory("keys_only"), "keys AND values"),
                            (_memory("query_heads"), "not the n_heads query heads"),
                            (_memory("window_ignored"), "only its last `window` tokens"),
                            (_memory("window_without_min"), "before the window is full"),
                            (_memory("no_k_sum"), "normaliser"),
                            (_memory("whole_conv"), "d_conv - 1"),
                            (_memory("d_model"), "d_inner = expand"),
                            (_memory("every_kind"), "one key per kind"),
                            (_memory("no_batch"), "multiply by the batch"),
                            (_memory("no_bytes"), "multiply by bytes_per_elem")],
    "width_for_budget": [(_width("state_dict"), "state_dict"), (_width("frozen"), "frozen"),
                         (_width("first_fit"), "largest one"), (_width("closest"), "not be "
                                                                "the closest"),
                         (_width("no_error"), "raise a ValueError")],
    "time_per_token": [(_timer("mean"), "median"), (_timer("per_call"), "divide by n_tokens"),
                       (_timer("no_warmup"), "warmup rounds"),
                       (_timer("not_interleaved"), "in turn"), (_timer("no_sync"), "sync\\(\\)")],
}
CASES = [(name, wrong, hint) for name, wrongs in WRONG.items() for wrong, hint in wrongs]


@pytest.mark.parametrize("name, wrong, hint", CASES,
                         ids=[wrong.__name__ for _, wrong, _ in CASES])
def test_wrong_answers_fail_both_and_the_visible_check_names_the_mistake(hidden, name, wrong,
                                                                          hint):
    with pytest.raises(CheckFailed, match=hint):
        getattr(checks, name)(wrong)
    expect_hidden_failure(lambda: getattr(hidden, name)(wrong))


# --- shortcuts: right numbers, but they call what the exercise asks to write -----------------

@torch.no_grad()
def _generate_by_model(model, prompt, max_new_tokens):
    return model.generate(prompt, max_new_tokens)


SHORTCUTS = [
    ("layer_plan", reference.layer_plan),
    ("hybrid_forward", lambda model, idx, cache=None: model(idx, cache=cache)),
    ("hybrid_forward", lambda model, idx, cache=None: model.forward(idx, cache)),
    ("generate", _generate_by_model),
    ("decode_memory_bytes", reference.decode_memory_bytes),
    ("width_for_budget", reference.width_for_budget),
    ("time_per_token", reference.time_per_token),
]


@pytest.mark.parametrize("name, shortcut", SHORTCUTS)
def test_shortcuts_fail_visible_and_hidden(hidden, name, shortcut):
    with pytest.raises(CheckFailed, match="write it yourself"):
        getattr(checks, name)(shortcut)
    expect_hidden_failure(lambda: getattr(hidden, name)(shortcut), "ShortcutUsed")


def test_not_started_exercises_say_so_in_one_line():
    def stub(*args):
        raise NotImplementedError()

    for name in EXERCISES:
        with pytest.raises(CheckFailed, match="is not done yet"):
            getattr(checks, name)(stub)


def test_hidden_verdicts_survive_a_patched_kernel(monkeypatch, solution):
    wrong = _memory("keys_only")
    monkeypatch.setattr(torch, "allclose", lambda *args, **kwargs: True)
    monkeypatch.setattr(numpy, "allclose", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.testing, "assert_close", lambda *args, **kwargs: None)
    monkeypatch.setattr(helpers.hybrid, "decode_memory_bytes", wrong)
    monkeypatch.setattr(helpers.hybrid.Hybrid, "forward", lambda self, idx, cache=None,
                        last_only=False: torch.zeros(*idx.shape, self.config.vocab_size))
    hidden = lesson(LESSON)  # loaded after the patches, as the hidden test cell does
    expect_hidden_failure(lambda: hidden.decode_memory_bytes(wrong))
    hidden.decode_memory_bytes(solution["decode_memory_bytes"])
    expect_hidden_failure(lambda: hidden.hybrid_forward(_forward("positions_restart")))
    hidden.hybrid_forward(solution["hybrid_forward"])
    assert helpers.hybrid.decode_memory_bytes is wrong  # still patched


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_solution_runs_on_cuda(solution):
    config = reference.HybridConfig(vocab_size=30, d_model=16, layout="MAL", n_heads=2,
                                    token_shift=True)
    model = reference.Hybrid(config).cuda().eval()
    prompt = torch.randint(30, (2, 5), device="cuda")
    with torch.no_grad():
        logits = solution["hybrid_forward"](model, prompt)
    assert logits.device.type == "cuda"
    tokens = solution["generate"](model, prompt, 6)
    assert torch.equal(tokens, model.generate(prompt, 6, use_cache=False))
