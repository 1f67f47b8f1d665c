"""Hidden tests for lesson 11 (hybrids): fresh layouts, configurations, dtypes and seeds;
models and references from a private copy of ``helpers``; expected values in plain
arithmetic where they are arithmetic; no shortcut through ``helpers.hybrid``. Every failure
names its seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from torch import nn

from helpers import hybrid as reference
from helpers.checks.lesson11 import FakeMachine
from helpers.device import get_device
from helpers.hidden import _core

KINDS = "ALM"
NOT_KINDS = "abcdlmxyzBCDEFGHIJKNOPQRSTUVWXYZ ?-*_."  # no digits: the message names a number
TOLERANCES = {torch.float32: {"atol": 1e-4, "rtol": 1e-4},
              torch.float64: {"atol": 1e-10, "rtol": 1e-8}}


def _mixed_layout(rng: random.Random, low: int, high: int, need: str = "") -> str:
    """A random layout of low .. high layers with at least two kinds and every kind in
    ``need``: then some layer's slot differs from its index in the stack."""
    while True:
        layout = "".join(rng.choice(KINDS) for _ in range(rng.randint(low, high)))
        if len(set(layout)) >= 2 and all(kind in layout for kind in need):
            return layout


def _expected_plan(layout: str) -> list[tuple[str, int]]:
    return [(kind, layout[:i].count(kind)) for i, kind in enumerate(layout)]


def layer_plan(student: Callable) -> None:
    """(kind, slot) per layer for random layouts; ValueErrors that name the bad character and
    its position, and one for an empty layout."""
    seed = _core.random_seed()
    with _core.reporting_seed(seed):
        rng = random.Random(seed)
        for layout in (_mixed_layout(rng, 2, 24), _mixed_layout(rng, 1, 6),
                       rng.choice(KINDS) * rng.randint(1, 5)):
            with _core.forbid(helpers=["helpers.hybrid.layer_plan", "helpers.hybrid.parse_layout"]):
                plan = student(layout)
            plan = [tuple(pair) for pair in plan]
            if plan != _expected_plan(layout):
                raise _core.HiddenTestFailed(f"layer_plan({layout!r}) = {plan}, expected "
                                             f"{_expected_plan(layout)}")
        for candidates in ("alm", NOT_KINDS, NOT_KINDS):  # a kind in lower case, then any
            good = _mixed_layout(rng, 2, 10)
            position = rng.randint(0, len(good))
            character = rng.choice(candidates)
            bad = good[:position] + character + good[position:]
            try:
                student(bad)
            except ValueError as error:
                if repr(character) not in str(error) or str(position) not in str(error):
                    raise _core.HiddenTestFailed(
                        f"the ValueError of layer_plan({bad!r}) should name {character!r} and "
                        f"its position {position}: {error}") from None
            else:
                raise _core.HiddenTestFailed(f"layer_plan({bad!r}) should raise a ValueError")
        try:
            student("")
        except ValueError:
            return
        raise _core.HiddenTestFailed("layer_plan('') should raise a ValueError")


def _config(rng: random.Random, layout: str, **fixed: object) -> reference.HybridConfig:
    """A random small configuration of the given layout."""
    n_kv_heads = rng.choice([1, 2])
    n_heads = n_kv_heads * rng.choice([1, 2])
    kernel = rng.choice(["sdpa", "reference", "flash"])
    options = dict(vocab_size=rng.randint(20, 60), d_model=rng.choice([8, 12, 16]),
                   n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=2 * rng.randint(1, 4),
                   kernel=kernel, window=None if kernel == "flash" or rng.random() < 0.5
                   else rng.randint(2, 6), d_state=rng.randint(2, 6), d_conv=rng.randint(2, 4),
                   expand=rng.randint(1, 2), d_ff=rng.choice([0, 8, 20]))
    options.update(fixed)
    return reference.HybridConfig(layout=layout, **options)


def _model(rng: random.Random, config: reference.HybridConfig,
           dtype: torch.dtype) -> reference.Hybrid:
    torch.manual_seed(rng.randint(0, 2**31))
    return reference.Hybrid(config).to(device=get_device(), dtype=dtype).eval()


def _tokens(rng: random.Random, vocab: int, B: int, L: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rng.randint(0, 2**31))
    return torch.randint(vocab, (B, L), generator=generator).to(get_device())


def _expect_same_cache(student: reference.HybridCache, ours: reference.HybridCache,
                       what: str, tolerance: dict[str, float]) -> None:
    """The student's cache holds what the reference's holds after the same calls."""
    if student.seq_len != ours.seq_len:
        raise _core.HiddenTestFailed(f"{what}: cache.seq_len is {student.seq_len}, expected "
                                     f"{ours.seq_len}")
    if student.kv is not None:
        for slot in range(ours.kv.n_layers):
            if student.kv.held(slot) != ours.kv.held(slot):
                raise _core.HiddenTestFailed(f"{what}: KV cache layer {slot} holds "
                                             f"{student.kv.held(slot)} tokens, expected "
                                             f"{ours.kv.held(slot)}")
    for kind, theirs, mine in (("Mamba", student.mamba, ours.mamba),
                               ("linear", student.linear, ours.linear)):
        for slot, (a, b) in enumerate(zip(theirs, mine)):
            for name in vars(b):
                _core.expect_close(getattr(a, name), getattr(b, name),
                                   f"{what}: {kind} state {slot}, {name}", **tolerance)


def hybrid_forward(student: Callable) -> None:
    """Random hybrids (RoPE and token shift on, every layout mixed), float32 and float64:
    logits without a cache, and over a prompt and two continuations on one cache, equal to
    one pass of the model; the cache then holds what the model's own would."""
    seed = _core.random_seed()
    with _core.reporting_seed(seed):
        rng = random.Random(seed)
        for dtype in (torch.float32, torch.float64):
            layout = _mixed_layout(rng, 3, 6, need="A")
            config = _config(rng, layout, rope=True, token_shift=True)
            model = _model(rng, config, dtype)
            B, L = rng.randint(1, 3), rng.randint(4, 12)
            idx = _tokens(rng, config.vocab_size, B, L)
            cuts = sorted(rng.sample(range(1, L), 2))
            what = f"hybrid_forward, layout {layout!r}, B={B}, L={L}, {dtype}"
            with torch.no_grad():
                expected = model(idx)
                with _core.forbid(helpers=["helpers.hybrid.Hybrid"]):
                    logits = student(model, idx)
                _core.expect_close(logits, expected, f"{what}, no cache", **TOLERANCES[dtype])
                cache, ours = model.empty_cache(B), model.empty_cache(B)
                pieces = []
                for a, b in zip((0, *cuts), (*cuts, L)):
                    with _core.forbid(helpers=["helpers.hybrid.Hybrid"]):
                        pieces.append(student(model, idx[:, a:b], cache))
                    model(idx[:, a:b], cache=ours)
            _core.expect_close(torch.cat(pieces, dim=1), expected,
                               f"{what}, cut at {cuts} on one cache", **TOLERANCES[dtype])
            _expect_same_cache(cache, ours, what, TOLERANCES[dtype])


def _greedy(model: reference.Hybrid, prompt: torch.Tensor, n_new: int) -> torch.Tensor:
    tokens = prompt
    with torch.no_grad():
        for _ in range(n_new):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


def generate(student: Callable) -> None:
    """Greedy tokens of random hybrids equal to reruns of the whole text, the prompt fed
    once and every later token alone, always with the cache."""
    seed = _core.random_seed()
    with _core.reporting_seed(seed):
        rng = random.Random(seed)
        for _ in range(2):
            layout = _mixed_layout(rng, 2, 5, need="A")
            config = _config(rng, layout, rope=rng.random() < 0.5,
                             token_shift=rng.random() < 0.5)
            model = _model(rng, config, torch.float64)
            # a prompt of 2 or more, so that the first position's logits are not the last's
            B, L, n_new = rng.randint(1, 3), rng.randint(2, 6), rng.randint(2, 8)
            prompt = _tokens(rng, config.vocab_size, B, L)
            for _ in range(50):  # one whose first and last positions pick different tokens
                with torch.no_grad():
                    logits = model(prompt)  # (B, L, V)
                if (logits[:, 0].argmax(-1) != logits[:, -1].argmax(-1)).any():
                    break
                prompt = _tokens(rng, config.vocab_size, B, L)
            expected = _greedy(model, prompt, n_new)
            calls: list[tuple[int, bool]] = []

            def record(module, args, kwargs):
                cache = kwargs.get("cache", args[1] if len(args) > 1 else None)
                calls.append(((args[0] if args else kwargs["idx"]).shape[1], cache is not None))

            hook = model.register_forward_pre_hook(record, with_kwargs=True)
            try:
                with _core.forbid(helpers=["helpers.transformer.decode"]):
                    tokens = student(model, prompt, n_new)
            finally:
                hook.remove()
            what = f"generate, layout {layout!r}, B={B}, prompt of {L}, {n_new} new tokens"
            if not isinstance(tokens, torch.Tensor) or not torch.equal(tokens, expected):
                raise _core.HiddenTestFailed(f"{what}: the tokens differ from those of a loop "
                                             "that reruns the whole text")
            if (not calls or calls[0] != (L, True) or len(calls) not in (n_new, n_new + 1)
                    or any(call != (1, True) for call in calls[1:])):
                raise _core.HiddenTestFailed(f"{what}: the model was called with {calls} "
                                             "(tokens, cache given): the prompt once, then one "
                                             "token per call, always with the cache")


def _expected_memory(config: reference.HybridConfig, n: int, batch: int,
                     size: int) -> dict[str, int]:
    c = config
    kept = n if c.window is None else min(n, c.window)
    per_layer = {"A": 2 * c.n_kv_heads * c.head_dim * kept,
                 "L": c.n_heads * c.head_dim * (c.head_dim + 1),
                 "M": c.expand * c.d_model * (c.d_state + c.d_conv - 1)}
    return {kind: c.layout.count(kind) * per_layer[kind] * batch * size
            for kind in KINDS if kind in c.layout}


def decode_memory_bytes(student: Callable) -> None:
    """Bytes per kind for random layouts, head counts, windows (shorter and longer than the
    context), Mamba shapes, batches and element sizes."""
    seed = _core.random_seed()
    with _core.reporting_seed(seed):
        rng = random.Random(seed)
        n = rng.randint(8, 5000)
        layouts = ("".join(rng.sample(KINDS * 3, rng.randint(3, 9))) + "ALM",  # every kind
                   "A" + "".join(rng.choice("AM") for _ in range(rng.randint(1, 6))),  # no L
                   "A" + "".join(rng.choice("AL") for _ in range(rng.randint(1, 6))))  # no M
        windows = (None, rng.randint(2, n - 1), rng.randint(n + 1, 2 * n))
        for layout, window in zip(layouts, rng.sample(windows, 3)):
            n_kv_heads = rng.randint(1, 4)
            config = reference.HybridConfig(
                vocab_size=100, d_model=rng.choice([16, 24, 32]), layout=layout,
                n_heads=n_kv_heads * rng.randint(2, 3), n_kv_heads=n_kv_heads,
                head_dim=2 * rng.randint(2, 16), window=window, d_state=rng.randint(2, 32),
                d_conv=rng.randint(2, 5), expand=rng.randint(2, 3))
            batch, size = rng.randint(2, 4), rng.choice([2, 4])
            with _core.forbid(helpers=["helpers.hybrid.decode_memory_bytes",
                                       "helpers.hybrid.Hybrid"]):
                result = student(config, n, batch, size)
            expected = _expected_memory(config, n, batch, size)
            if result != expected:
                raise _core.HiddenTestFailed(
                    f"decode_memory_bytes for layout {layout!r} (n_heads {config.n_heads}, "
                    f"n_kv_heads {n_kv_heads}, head_dim {config.head_dim}, window {window}, "
                    f"d_state {config.d_state}, d_conv {config.d_conv}, expand "
                    f"{config.expand}), seq_len {n}, batch {batch}, {size} bytes: got "
                    f"{result}, expected {expected}")


class _Model(nn.Module):
    """A tied embedding and output layer, a trainable square layer, a large frozen table and
    a buffer: ``vocab·w + w² + w`` trainable parameters."""

    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.frozen = nn.Embedding(3 * vocab, width).requires_grad_(False)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embedding.weight
        self.register_buffer("table", torch.zeros(vocab * width))


def width_for_budget(student: Callable) -> None:
    """Shuffled widths and budgets where the answer is neither the first width that fits,
    nor the closest, nor what the state_dict or the frozen table would allow; a budget
    exactly met; a ValueError when nothing fits."""
    seed = _core.random_seed()
    with _core.reporting_seed(seed):
        rng = random.Random(seed)
        vocab = rng.randint(80, 128)
        widths = list(range(4 * rng.randint(2, 4), 68, 4))[:rng.randint(5, 8)]
        answer = widths[rng.randint(2, len(widths) - 2)]  # neither the smallest nor the largest

        def count(width: int) -> int:
            return vocab * width + width * width + width

        order = widths[:]
        rng.shuffle(order)
        order.remove(widths[0])
        order.insert(0, widths[0])  # the first width that fits is not the largest
        bigger = widths[widths.index(answer) + 1]
        for budget in (count(bigger) - 1, count(answer)):
            with _core.forbid(helpers=["helpers.hybrid.width_for_budget",
                                       "helpers.hybrid.count_parameters"]):
                width = student(lambda w: _Model(vocab, w), budget, iter(order))
            if width != answer:
                raise _core.HiddenTestFailed(
                    f"width_for_budget with widths {order} and budget {budget} (width w has "
                    f"{vocab}·w + w² + w trainable parameters) gave {width}, expected {answer}")
        try:
            student(lambda w: _Model(vocab, w), count(widths[0]) - 1, order)
        except ValueError:
            return
        raise _core.HiddenTestFailed("width_for_budget should raise a ValueError when no "
                                     "width fits the budget")


def time_per_token(student: Callable) -> None:
    """A fake asynchronous machine with random durations (one slow round each) and a
    synchronous one with sync=None: the call order, the median per token."""
    seed = _core.random_seed()
    with _core.reporting_seed(seed):
        rng = random.Random(seed)
        warmup, repeats, n_tokens = rng.randint(1, 3), rng.choice([3, 5, 7]), rng.randint(2, 99)
        names = [f"f{i}" for i in range(rng.randint(2, 4))]
        timed = {name: [rng.uniform(1, 10) for _ in range(repeats - 1)] + [1000.0]
                 for name in names}
        for times in timed.values():
            rng.shuffle(times)
        machine = FakeMachine({name: [rng.uniform(5000, 9000)] * warmup + times
                               for name, times in timed.items()})
        fns = {name: machine.function(name) for name in names}
        with _core.forbid(helpers=["helpers.hybrid.time_per_token"]):
            result = student(fns, n_tokens, repeats, warmup, machine.sync, machine.clock)
        calls = [event for event in machine.log if event in timed]
        if calls != names * (warmup + repeats):
            raise _core.HiddenTestFailed(f"time_per_token called the functions in the order "
                                         f"{calls}: expected {warmup} warmup and {repeats} "
                                         "timed rounds, each function once per round in turn")
        if not isinstance(result, dict) or set(result) != set(names):
            raise _core.HiddenTestFailed(f"time_per_token should return a dict keyed by "
                                         f"{names}, got {result!r}")
        for name, times in timed.items():
            _core.expect_close(torch.tensor(float(result[name])),
                               torch.tensor(sorted(times)[repeats // 2] / n_tokens),
                               f"time_per_token for {name} (repeats {repeats}, warmup "
                               f"{warmup}, n_tokens {n_tokens})", atol=1e-9, rtol=1e-9)
        plain = FakeMachine({"x": [9.0] * warmup + [3.0, 1.0, 2.0]}, asynchronous=False)
        result = student({"x": plain.function("x")}, n_tokens, 3, warmup, None, plain.clock)
        _core.expect_close(torch.tensor(float(result["x"])), torch.tensor(2.0 / n_tokens),
                           "time_per_token with sync=None", atol=1e-9, rtol=1e-9)
