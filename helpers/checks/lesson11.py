"""Visible checks for lesson 11 (hybrids and the big picture).

Each check runs the student's function on small fixed inputs against the course's
``helpers.hybrid`` and, when it fails, names the likely mistake: a slot counted over the
whole stack, positions that restart at every call, a cache not passed on, a formula that
forgets the values or the window, a parameter counted twice, a clock read before the GPU
has finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from helpers import hybrid as reference
from helpers.checks import (CheckFailed, call, expect, expect_close, expect_shape,
                            expect_tensor, exercise, is_close, passed, without_shortcuts)
from helpers.device import get_device

HYBRID_SHORTCUTS = ["helpers.hybrid.Hybrid"]  # its forward, generate, decode_memory_bytes


def _model(layout: str, seed: int, **options: object) -> reference.Hybrid:
    """A small float64 hybrid on the course device, the same for a given seed."""
    torch.manual_seed(seed)
    config = dict(vocab_size=40, d_model=16, n_heads=2, n_kv_heads=1, d_state=4, d_ff=24)
    config.update(options)
    model = reference.Hybrid(reference.HybridConfig(layout=layout, **config))
    return model.double().to(get_device()).eval()


def _tokens(B: int, L: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(40, (B, L), generator=generator).to(get_device())


# --- exercise 1: layer_plan -------------------------------------------------------------------

@exercise
def layer_plan(fn: Callable) -> None:
    """Check ``layer_plan(layout)`` -> [(kind, slot), ...] and its errors."""
    for layout in ("MMMMAMMM", "A", "MALMAL", "LLAMA"):
        with without_shortcuts("layer_plan", helpers=["helpers.hybrid.layer_plan",
                                                       "helpers.hybrid.parse_layout"]):
            plan = call(fn, layout, name=f"layer_plan({layout!r})")
        expect(isinstance(plan, (list, tuple)), f"layer_plan({layout!r}) should return a list "
               f"of (kind, slot) pairs, got {type(plan).__name__}")
        plan = [tuple(pair) if isinstance(pair, (list, tuple)) else pair for pair in plan]
        expected = reference.layer_plan(layout)
        if plan == [(kind, i) for i, kind in enumerate(layout)] and plan != expected:
            raise CheckFailed(f"layer_plan({layout!r}) = {plan}: that is each layer's index in "
                              "the whole stack; the slot counts only the earlier layers of the "
                              "same kind (the first attention layer is slot 0 of the KV cache)")
        if plan == [(kind, slot + 1) for kind, slot in expected]:
            raise CheckFailed(f"layer_plan({layout!r}) = {plan}: slots count from 0, as the "
                              "layers of a KV cache and the indices of a list")
        expect(plan == expected, f"layer_plan({layout!r}) = {plan}, expected {expected}")
    for bad, position in (("mmam", 0), ("MMxA", 2), ("AM M", 2), ("MAMA?", 4)):
        character = bad[position]
        try:
            fn(bad)
        except ValueError as error:
            expect(repr(character) in str(error) and str(position) in str(error),
                   f"the ValueError of layer_plan({bad!r}) says {str(error)!r}: name the bad "
                   f"character as repr writes it, {character!r}, and its position, {position}")
        except Exception as error:
            raise CheckFailed(f"layer_plan({bad!r}) raised {type(error).__name__}, not "
                              "ValueError") from error
        else:
            raise CheckFailed(f"layer_plan({bad!r}) should raise a ValueError: {character!r} at "
                              f"position {position} is not A, L or M (lower case is not "
                              "accepted)")
    try:
        fn("")
    except ValueError:
        pass
    except Exception as error:
        raise CheckFailed(f"layer_plan('') raised {type(error).__name__}, not ValueError"
                          ) from error
    else:
        raise CheckFailed("layer_plan('') should raise a ValueError: a model needs layers")
    passed("layer_plan")


# --- exercise 2: hybrid_forward ---------------------------------------------------------------

def _forward_restarting_positions(model: reference.Hybrid, idx: torch.Tensor,
                                  cache: reference.HybridCache) -> torch.Tensor:
    """The forward pass with the one mistake of positions that start at 0 at every call."""
    positions = torch.arange(idx.shape[1], device=idx.device)
    x = model.embedding(idx, cache)
    for layer, (_, slot) in zip(model.layers, model.plan):
        x = layer(x, positions, cache, slot)
    cache.seq_len += idx.shape[1]
    return model.lm_head(model.norm(x))


def _in_pieces(forward: Callable, model: reference.Hybrid, idx: torch.Tensor,
               cache: reference.HybridCache, cuts: tuple[int, ...]) -> torch.Tensor:
    """forward over idx cut at ``cuts`` on one cache, the logits concatenated: (B, L, V)."""
    bounds = (0, *cuts, idx.shape[1])
    return torch.cat([forward(model, idx[:, a:b], cache) for a, b in zip(bounds, bounds[1:])],
                     dim=1)


@exercise
def hybrid_forward(fn: Callable) -> None:
    """Check ``hybrid_forward(model, idx, cache=None)`` against the model's own forward."""
    B, L, cuts = 2, 9, (4, 5)
    idx = _tokens(B, L, seed=1)
    slot_hint = ("each layer reads its slot: its index among the layers of its kind "
                 "(layer_plan), not its index in the stack")

    def run(model, tokens, cache=None):
        with without_shortcuts("hybrid_forward", helpers=HYBRID_SHORTCUTS,
                               hint="run the embedding, the layers and the head yourself"):
            return call(fn, model, tokens, cache, name="hybrid_forward(model, idx, cache)",
                        hint=slot_hint)

    model = _model("MAMLA", seed=0)
    logits = expect_tensor(run(model, idx), "hybrid_forward(model, idx)")
    expect_shape(logits, (B, L, 40), "hybrid_forward(model, idx)",
                 "logits (B, L, vocab_size): return model.lm_head(model.norm(x))")
    with torch.no_grad():
        expected = model(idx)
        unnormed = model.lm_head(_hidden(model, idx))
    expect(not is_close(logits, unnormed), "the logits skip the final norm: return "
           "model.lm_head(model.norm(x))")
    expect_close(logits, expected, "hybrid_forward(model, idx) without a cache",
                 "embed, run every layer in order with positions 0 .. L-1, then norm and head")

    cache = model.empty_cache(B)
    first = run(model, idx[:, :cuts[0]], cache)
    expect(cache.seq_len == cuts[0], f"after a prompt of {cuts[0]} tokens cache.seq_len is "
           f"{cache.seq_len}, expected {cuts[0]}: advance it by L at the end")
    expect(cache.kv.held(0) == cuts[0] and cache.kv.held(1) == cuts[0],
           "the attention layers did not fill the KV cache: pass the cache and the slot to "
           "every layer, layer(x, positions, cache, slot)")
    expect(cache.last_tokens is not None, "cache.last_tokens is still None: pass the cache to "
           "the embedding, model.embedding(idx, cache), so the next call knows the last token")
    expect_close(first, expected[:, :cuts[0]], "the logits of the prompt, with a cache",
                 slot_hint)

    shift_only = _model("MLA", seed=2, rope=False, token_shift=True)
    with torch.no_grad():
        wanted = shift_only(idx)
    pieces = _in_pieces(lambda m, t, c: run(m, t, c), shift_only, idx,
                        shift_only.empty_cache(B), cuts)
    expect_close(pieces, wanted, "prompt then continuation, no RoPE, token shift",
                 "each call must continue the cache's sequences: pass the cache to "
                 "model.embedding and to every layer, with the layer's own slot")

    with torch.no_grad():
        wrong = _in_pieces(_forward_restarting_positions, model, idx, model.empty_cache(B), cuts)
    pieces = _in_pieces(lambda m, t, c: run(m, t, c), model, idx, model.empty_cache(B), cuts)
    expect(not is_close(pieces, wrong), "the positions restart at 0 at every call: they start "
           "at cache.seq_len, the number of tokens the cache has seen")
    expect_close(pieces, expected, "prompt then continuation with a cache (RoPE, token shift)",
                 "the positions of the new tokens are cache.seq_len .. cache.seq_len + L - 1")
    passed("hybrid_forward")


def _hidden(model: reference.Hybrid, idx: torch.Tensor) -> torch.Tensor:
    """The residual stream after the last layer, (B, L, d_model): before the final norm."""
    positions = torch.arange(idx.shape[1], device=idx.device)
    x = model.embedding(idx)
    for layer, (_, slot) in zip(model.layers, model.plan):
        x = layer(x, positions, None, slot)
    return x


# --- exercise 3: generate ---------------------------------------------------------------------

def _greedy_by_full_forward(model: reference.Hybrid, prompt: torch.Tensor,
                            n_new: int) -> torch.Tensor:
    """The oracle: rerun the whole text for every new token and take the argmax."""
    tokens = prompt
    with torch.no_grad():
        for _ in range(n_new):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


class _FedTokens:
    """Records, for each call of a model's forward, how many tokens it got and whether a
    cache came with them."""

    def __init__(self, model: nn.Module):
        self.calls: list[tuple[int, bool]] = []
        self.handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        cache = kwargs.get("cache", args[1] if len(args) > 1 else None)
        self.calls.append((args[0].shape[1] if args else kwargs["idx"].shape[1],
                           cache is not None))

    def remove(self) -> None:
        self.handle.remove()


@exercise
def generate(fn: Callable) -> None:
    """Check ``generate(model, prompt, max_new_tokens)`` against reruns of the whole text."""
    B, L, n_new = 2, 5, 7
    prompt = _tokens(B, L, seed=3)
    for layout, seed in (("MA", 4), ("AMLM", 5)):
        model = _model(layout, seed, token_shift=True)
        expected = _greedy_by_full_forward(model, prompt, n_new)
        fed = _FedTokens(model)
        try:
            with without_shortcuts("generate", helpers=["helpers.transformer.decode"],
                                   hint="write the loop yourself; model.generate is the answer"):
                tokens = call(fn, model, prompt, n_new, name="generate(model, prompt, 7)",
                              hint="make the cache with model.empty_cache(B) and call "
                                   "model(tokens, cache=cache)")
        finally:
            fed.remove()
        tokens = expect_tensor(tokens, "generate(model, prompt, 7)")
        expect_shape(tokens, (B, L + n_new), "generate(model, prompt, 7)",
                     "the prompt (B, L) followed by the new tokens (B, max_new_tokens)")
        expect(torch.equal(tokens[:, :L], prompt), "the result should start with the prompt")
        expect(bool(fed.calls) and fed.calls[0] == (L, True),
               f"the first call of the model got {fed.calls[:1]} (tokens, with a cache): run "
               f"the whole prompt ({L} tokens) once, with the cache")
        later = fed.calls[1:]
        expect(all(with_cache for _, with_cache in later),
               "a call of the model came without the cache: pass cache=cache every time")
        expect(all(length == 1 for length, _ in later),
               f"after the prompt the model got {[length for length, _ in later]} tokens per "
               "call: the cache holds every earlier token, feed only the new one")
        expect(len(fed.calls) in (n_new, n_new + 1),
               f"{len(fed.calls)} calls of the model for {n_new} new tokens: one for the "
               "prompt, then one per new token")
        expect(torch.equal(tokens, expected), f"layout {layout!r}: the tokens differ from those "
               "of a loop that reruns the whole text: take the argmax of the last position's "
               "logits, logits[:, -1]")
    passed("generate")


# --- exercise 4: decode_memory_bytes ----------------------------------------------------------

_MEMORY_CASES = {
    "MHA": dict(layout="AAA", n_heads=4, n_kv_heads=4),
    "GQA": dict(layout="AAA", n_heads=4, n_kv_heads=2),
    "sliding window": dict(layout="AA", n_heads=4, n_kv_heads=2, window=12),
    "linear attention": dict(layout="LL", n_heads=4),
    "Mamba": dict(layout="MMM", expand=2, d_state=8, d_conv=3),
    "hybrid": dict(layout="MALM", n_heads=4, n_kv_heads=1, expand=3, d_state=4, d_conv=4),
}


def _memory_mistakes(config: reference.HybridConfig, n: int, batch: int,
                     size: int) -> dict[str, tuple[dict[str, int], str]]:
    """What typical wrong formulas give: (result, the message that names the mistake)."""
    c = config
    right = reference.decode_memory_bytes(c, n, batch, size)

    def with_kind(kind: str, per_layer: int) -> dict[str, int]:
        return {**right, kind: c.count(kind) * per_layer * batch * size}

    kept = n if c.window is None else min(n, c.window)
    mistakes = {}
    if "A" in c.layout:
        mistakes.update({
            "values": (with_kind("A", c.n_kv_heads * c.head_dim * kept),
                       "attention keeps keys AND values: 2 · n_kv_heads · head_dim per token"),
            "query heads": (with_kind("A", 2 * c.n_heads * c.head_dim * kept),
                            "the cache holds the n_kv_heads K/V heads, not the n_heads query "
                            "heads (GQA)"),
            "window": (with_kind("A", 2 * c.n_kv_heads * c.head_dim * n),
                       "with a window an attention layer keeps only its last `window` tokens: "
                       "min(seq_len, window)"),
            "whole window": (with_kind("A", 2 * c.n_kv_heads * c.head_dim * (c.window or n)),
                             "before the window is full, an attention layer keeps only the "
                             "seq_len tokens it has seen: min(seq_len, window)"),
        })
    if "L" in c.layout:
        mistakes["k_sum"] = (with_kind("L", c.n_heads * c.head_dim ** 2),
                             "linear attention also keeps the normaliser Σ φ(k), head_dim "
                             "numbers per head")
    if "M" in c.layout:
        mistakes.update({
            "d_conv": (with_kind("M", c.d_inner * (c.d_state + c.d_conv)),
                       "the convolution keeps its last d_conv - 1 inputs (the next one is the "
                       "new token)"),
            "d_model": (with_kind("M", c.d_model * (c.d_state + c.d_conv - 1)),
                        "a Mamba layer's state has d_inner = expand · d_model channels"),
        })
    mistakes["batch"] = ({k: v // batch for k, v in right.items()},
                         "multiply by the batch: every sequence keeps its own memory")
    mistakes["bytes"] = ({k: v // size for k, v in right.items()},
                         "multiply by bytes_per_elem: the formula counts numbers, the answer "
                         "bytes")
    return {name: (wrong, hint) for name, (wrong, hint) in mistakes.items() if wrong != right}


@exercise
def decode_memory_bytes(fn: Callable) -> None:
    """Check ``decode_memory_bytes(config, seq_len, batch, bytes_per_elem)`` per kind."""
    batch, size = 3, 4
    for name, options in _MEMORY_CASES.items():
        config = reference.HybridConfig(vocab_size=50, d_model=32, **options)
        for n in (5, 20):
            with without_shortcuts("decode_memory_bytes",
                                   helpers=["helpers.hybrid.decode_memory_bytes",
                                            *HYBRID_SHORTCUTS]):
                result = call(fn, config, n, batch, size,
                              name=f"decode_memory_bytes({name}, seq_len={n})")
            expect(isinstance(result, dict), f"decode_memory_bytes should return a dict from "
                   f"layer kind to bytes, got {type(result).__name__}")
            expected = reference.decode_memory_bytes(config, n, batch, size)
            expect(set(result) == set(expected), f"{name} ({config.layout!r}): keys "
                   f"{sorted(result)}, expected {sorted(expected)}: one key per kind of layer "
                   "present in the layout")
            if result != expected:
                for wrong, hint in _memory_mistakes(config, n, batch, size).values():
                    expect(result != wrong, f"{name}, seq_len={n}: {hint}")
                raise CheckFailed(f"{name} ({config.layout!r}), seq_len={n}, batch={batch}, "
                                  f"{size} bytes: got {result}, expected {expected}")
    default = reference.HybridConfig(vocab_size=50, d_model=32, layout="AM")
    expect(fn(default, 7) == reference.decode_memory_bytes(default, 7),
           "the defaults are batch=1 and bytes_per_elem=2")
    for layout in ("MAMLA", "AALM"):  # against a real cache, in float32
        model = _model(layout, seed=6, n_kv_heads=2).float()
        cache = model.empty_cache(2)
        with torch.no_grad():
            model(_tokens(2, 7, seed=7), cache=cache)
        measured = cache.nbytes_by_kind()
        expect(fn(model.config, 7, 2, 4) == measured, f"layout {layout!r}: a real cache after 7 "
               f"tokens of 2 sequences holds {measured} bytes (float32), your formula gives "
               f"{fn(model.config, 7, 2, 4)}")
    passed("decode_memory_bytes")


# --- exercise 5: width_for_budget -------------------------------------------------------------

class _TiedModel(nn.Module):
    """An embedding tied to the output layer, a trainable square layer, a frozen one and a
    buffer: 10·w + w² + w trainable parameters."""

    def __init__(self, width: int):
        super().__init__()
        self.embedding = nn.Embedding(10, width)
        self.mix = nn.Linear(width, width)
        self.frozen = nn.Linear(width, width).requires_grad_(False)
        self.head = nn.Linear(width, 10, bias=False)
        self.head.weight = self.embedding.weight
        self.register_buffer("table", torch.zeros(50 * width))


def _trainable(width: int) -> int:
    return 10 * width + width * width + width


@exercise
def width_for_budget(fn: Callable) -> None:
    """Check ``width_for_budget(build, budget, widths)`` on a model with a tied weight, a
    frozen layer and a buffer."""
    widths = [8, 32, 16, 24, 12]
    budget = _trainable(32) - 1  # 24 fits, 32 is closer but does not; each mistake gives
    # another width: the state_dict 12, the frozen layer 16, the first that fits 8
    with without_shortcuts("width_for_budget",
                           helpers=["helpers.hybrid.width_for_budget",
                                    "helpers.hybrid.count_parameters"]):
        width = call(fn, _TiedModel, budget, widths, name="width_for_budget(build, budget, "
                     "widths)")
    state_dict_count = {w: sum(t.numel() for t in _TiedModel(w).state_dict().values())
                        for w in widths}
    all_params = {w: _trainable(w) + w * w + w for w in widths}  # frozen layer counted
    if width == max(w for w in widths if state_dict_count[w] <= budget):
        raise CheckFailed("you counted the state_dict: it lists the tied weight twice and "
                          "holds buffers; count model.parameters() that require grad")
    if width == max(w for w in widths if all_params[w] <= budget):
        raise CheckFailed("a frozen parameter (requires_grad=False) was counted: count only "
                          "trainable ones")
    expect(width != 8, "the first width that fits is not the answer: take the largest one "
           "(widths come in any order)")
    expect(width != 32, f"width 32 gives {_trainable(32)} parameters, above the budget "
           f"{budget}: the answer must fit within it, not be the closest")
    expect(width == 24, f"width_for_budget gave {width}, expected 24 (the largest width with "
           f"at most {budget} trainable parameters)")
    expect(fn(_TiedModel, _trainable(12), iter(widths)) == 12,
           "widths may be any iterable (an iterator can be read once)")
    try:
        fn(_TiedModel, _trainable(8) - 1, widths)
    except ValueError:
        pass
    except Exception as error:
        raise CheckFailed(f"no width fits: expected a ValueError, got {type(error).__name__}"
                          ) from error
    else:
        raise CheckFailed("no width fits the budget: raise a ValueError")
    passed("width_for_budget")


# --- exercise 6: time_per_token ---------------------------------------------------------------

class FakeMachine:
    """A clock, a ``sync`` and functions whose work lands on the clock only at a sync, as
    on a GPU (``asynchronous``), or at once; every event is logged."""

    def __init__(self, durations: dict[str, list[float]], asynchronous: bool = True):
        self.durations = {name: list(times) for name, times in durations.items()}
        self.asynchronous, self.now, self.pending = asynchronous, 0.0, 0.0
        self.log: list[str] = []

    def clock(self) -> float:
        self.log.append("clock")
        return self.now

    def sync(self) -> None:
        self.log.append("sync")
        self.now, self.pending = self.now + self.pending, 0.0

    def function(self, name: str) -> Callable[[], None]:
        def run() -> None:
            self.log.append(name)
            seconds = self.durations[name].pop(0)
            if self.asynchronous:
                self.pending += seconds
            else:
                self.now += seconds
        return run


@exercise
def time_per_token(fn: Callable) -> None:
    """Check ``time_per_token(fns, n_tokens, repeats, warmup, sync, clock)`` on a fake clock."""
    warmup, repeats, n_tokens = 2, 5, 4
    timed = {"a": [3.0, 1.0, 100.0, 2.0, 4.0], "b": [10.0, 30.0, 20.0, 50.0, 40.0]}
    machine = FakeMachine({name: [1000.0] * warmup + times for name, times in timed.items()})
    with without_shortcuts("time_per_token", helpers=["helpers.hybrid.time_per_token"]):
        result = call(fn, {name: machine.function(name) for name in timed}, n_tokens, repeats,
                      warmup, machine.sync, machine.clock,
                      name="time_per_token(fns, 4, repeats=5, warmup=2, sync, clock)")
    expect(isinstance(result, dict) and set(result) == set(timed),
           f"time_per_token should return a dict with the names of fns, {sorted(timed)}, got "
           f"{result!r}")
    calls = [event for event in machine.log if event in timed]
    expect(calls == ["a", "b"] * (warmup + repeats),
           f"the functions ran in the order {calls}: {warmup} warmup rounds, then {repeats} "
           "timed rounds, each round calling every function once in turn (a, b, a, b, ...)")
    expect(result["a"] != 0, "the measured time is 0: the work of a GPU reaches the clock "
           "only when you wait for it; call sync() before reading the clock after fn()")
    medians = {name: sorted(times)[len(times) // 2] for name, times in timed.items()}
    means = {name: sum(times) / len(times) for name, times in timed.items()}
    expect(not is_close(torch.tensor(result["a"]), torch.tensor(means["a"] / n_tokens)),
           "that is the mean time: take the median, which one slow round does not move")
    expect(not is_close(torch.tensor(result["a"]), torch.tensor(medians["a"])),
           f"that is the time per call: divide by n_tokens ({n_tokens}) for the time per token")
    expect(result["a"] < 100, "the warmup rounds were timed: run them before starting the clock")
    for name in timed:
        expect_close(torch.tensor(float(result[name])),
                     torch.tensor(medians[name] / n_tokens), f"time_per_token for {name!r}",
                     "the median over the timed rounds, per token")
    plain = FakeMachine({"x": [5.0, 1.0, 2.0, 3.0]}, asynchronous=False)
    result = call(fn, {"x": plain.function("x")}, 2, 3, 1, None, plain.clock,
                  name="time_per_token(fns, 2, repeats=3, warmup=1, sync=None, clock)")
    expect_close(torch.tensor(float(result["x"])), torch.tensor(1.0),
                 "time_per_token with sync=None", "sync=None means no synchronisation")
    real = fn({"sleep": lambda: time.sleep(0.002)}, 1, repeats=2, warmup=0)
    expect(0.0015 < real["sleep"] < 0.5, f"with the default clock a call that sleeps 2 ms "
           f"measured {real['sleep']:.4f} s: the default clock is time.perf_counter")
    passed("time_per_token")

