"""Hybrid stacks of attention and state space layers (lesson 11): Jamba and its relatives.

Attention recalls any earlier token exactly, and pays for it with a KV cache that grows with
the context; a Mamba layer keeps a state of constant size, and must choose what to keep
(Arora et al., 2023, "Zoology: Measuring and Improving Recall in Efficient Language Models").
A hybrid interleaves the two: Jamba (Lieber et al., 2024, "Jamba: A Hybrid Transformer-Mamba
Language Model") puts one attention layer in every eight, so its cache is an eighth of a
transformer's while a few layers can still look back exactly.

A stack is written as a layout string, one character per layer:

- ``A``: causal softmax attention, :class:`AttentionMixer`: grouped-query heads
  (``n_kv_heads``, lesson 07), rotary positions (``rope``; Jamba has none, its Mamba layers
  know the order), an optional sliding ``window``, and a choice of kernel: PyTorch's fused
  SDPA (banded for a window, :mod:`helpers.sliding_window`), the materialised reference of
  lessons 02-03, or the tiled FlashAttention of lesson 06;
- ``M``: a Mamba mixer (:class:`helpers.ssm.MambaMixer`, lesson 10);
- ``L``: causal linear attention (:class:`LinearAttentionMixer`, lesson 08), so that every
  mechanism of the course is one layout of one model and can be compared on equal terms.

Every layer is Jamba's: ``x + mixer(norm(x))``, then ``x + mlp(norm(x))`` with a SwiGLU
feed-forward (none when ``d_ff = 0``). :class:`HybridCache` holds what decoding keeps: one KV
cache (:mod:`helpers.kv_cache`) whose layers are the attention layers, a
:class:`~helpers.ssm.MambaState` per Mamba layer and a :class:`LinearAttentionState` per
linear-attention layer; :func:`layer_plan` says which slot each layer uses, and
:func:`decode_memory_bytes` counts the bytes of each kind from first principles.
:func:`time_per_token` and :func:`compare_mechanisms` measure time and memory per token of
several stacks against the context length, the same way for all.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from helpers.attention import (
    MultiHeadAttention,
    causal_mask,
    merge_heads,
    repeat_kv,
    scaled_dot_product_attention,
    sliding_window_mask,
    split_heads,
)
from helpers.device import one_cpu_thread, peak_memory
from helpers.kv_cache import KVCache, SinkCache, kv_cache_bytes
from helpers.linear_attention import elu_feature_map, linear_attention
from helpers.rope import apply_rope, rope_cos_sin
from helpers.sliding_window import sliding_window_attention
from helpers.ssm import MambaMixer, MambaState, mamba_state_bytes
from helpers.transformer import RMSNorm, SwiGLU, causal_gqa_attention, decode

LAYER_KINDS = {"A": "attention", "L": "linear attention", "M": "Mamba"}
KERNELS = ("sdpa", "reference", "flash")
FLASH_BLOCK = 128  # tiles of FlashAttention: on a CPU, large tiles amortise Python's cost per tile

# --- layouts -------------------------------------------------------------------------------


def parse_layout(layout: str) -> str:
    """Check a layout string such as ``"MMMAMMMA"``: one character per layer, A, L or M.

    Returns the layout; raises a ValueError that names the first bad character and where it is.
    """
    if not isinstance(layout, str) or not layout:
        raise ValueError(f"layout should be a non-empty string with one character per layer "
                         f"(A attention, L linear attention, M Mamba), got {layout!r}")
    for position, kind in enumerate(layout):
        if kind not in LAYER_KINDS:
            raise ValueError(f"layout {layout!r}: character {kind!r} at position {position} is "
                             f"not a layer kind; use A (attention), L (linear attention) or "
                             f"M (Mamba)")
    return layout


def layer_plan(layout: str) -> list[tuple[str, int]]:
    """For each layer, its kind and its slot: its index among the layers of that kind.

    The slot is where the layer's decoding memory lives in a :class:`HybridCache`: its layer
    of the KV cache for attention, its entry of ``mamba`` or ``linear`` otherwise.
    ``layer_plan("MMAM") == [("M", 0), ("M", 1), ("A", 0), ("M", 2)]``.
    """
    seen = dict.fromkeys(LAYER_KINDS, 0)
    plan = []
    for kind in parse_layout(layout):
        plan.append((kind, seen[kind]))
        seen[kind] += 1
    return plan


def jamba_layout(n_layers: int, attention_period: int = 8, attention_offset: int = 4) -> str:
    """Jamba's layout: layer ``i`` is attention when ``i % period == offset``, Mamba otherwise.

    Lieber et al. (2024) found one attention layer in eight enough (Hugging Face's
    ``JambaConfig``: ``attn_layer_period=8``, ``attn_layer_offset=4``): ``"MMMMAMMM"`` for 8.
    """
    if n_layers < 1 or attention_period < 1 or not 0 <= attention_offset < attention_period:
        raise ValueError(f"need n_layers >= 1, attention_period >= 1 and 0 <= attention_offset < "
                         f"attention_period, got {n_layers}, {attention_period}, "
                         f"{attention_offset}")
    return "".join("A" if i % attention_period == attention_offset else "M"
                   for i in range(n_layers))


# --- configuration -------------------------------------------------------------------------


@dataclass
class HybridConfig:
    """Everything that shapes a :class:`Hybrid`.

    ``layout``: one character per layer (:func:`parse_layout`). Attention layers (A) have
    ``n_heads`` query heads of ``head_dim`` (default ``d_model // n_heads``) and
    ``n_kv_heads`` K/V heads (default ``n_heads``: MHA; 1: MQA); ``rope`` rotates queries and
    keys (base ``rope_base``); ``window`` lets each query see its last ``window`` keys;
    ``kernel`` computes attention with ``"sdpa"`` (PyTorch's fused kernel, banded for a
    window), ``"reference"`` (materialised weights, lessons 02-03) or ``"flash"`` (tiled,
    lesson 06; no window). Linear-attention layers (L) use ``n_heads`` heads of ``head_dim``
    and the feature map elu + 1. Mamba layers (M) have ``d_state``, ``d_conv``, ``expand``,
    ``dt_rank`` as :class:`helpers.ssm.MambaMixer`. Each mixer is followed by a SwiGLU
    feed-forward of width ``d_ff`` (default ``4 * d_model``; 0: none). ``token_shift`` adds
    to each token's embedding a learned embedding of the token before it
    (:class:`TokenEmbedding`).
    """

    vocab_size: int
    d_model: int
    layout: str = "MMMMAMMM"
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    rope: bool = True
    rope_base: float = 10000.0
    window: int | None = None
    kernel: str = "sdpa"
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    d_ff: int | None = None
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    token_shift: bool = False

    def __post_init__(self) -> None:
        parse_layout(self.layout)
        self.n_kv_heads = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model={self.d_model} is not divisible by "
                                 f"n_heads={self.n_heads}: give head_dim")
            self.head_dim = self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by "
                             f"n_kv_heads={self.n_kv_heads}")
        self.d_ff = 4 * self.d_model if self.d_ff is None else self.d_ff
        self.dt_rank = math.ceil(self.d_model / 16) if self.dt_rank is None else self.dt_rank
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel should be one of {KERNELS}, got {self.kernel!r}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be at least 1 (or None), got {self.window}")
        if self.window is not None and self.kernel == "flash":
            raise ValueError("the flash kernel has no sliding window: use kernel='sdpa' "
                             "(banded) or 'reference'")
        if self.rope and self.head_dim % 2:
            raise ValueError(f"RoPE rotates pairs of channels: head_dim must be even, got "
                             f"{self.head_dim}")

    @property
    def d_inner(self) -> int:
        """Width of a Mamba layer's inner branch, ``expand * d_model``."""
        return self.expand * self.d_model

    def count(self, kind: str) -> int:
        """Number of layers of ``kind`` ("A", "L" or "M") in the layout."""
        return self.layout.count(kind)


# --- the mixers ----------------------------------------------------------------------------


class AttentionMixer(nn.Module):
    """Causal self-attention for a hybrid: grouped K/V heads, optional RoPE and window.

    The projections are :class:`helpers.attention.MultiHeadAttention`'s (no biases). The keys
    and values join the KV cache already rotated, so a cached key is never rotated again.
    """

    def __init__(self, config: HybridConfig):
        super().__init__()
        self.config = config
        self.attn = MultiHeadAttention(config.d_model, config.n_heads, config.n_kv_heads,
                                       bias=False, head_dim=config.head_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: object | None = None,
                layer: int = 0) -> torch.Tensor:
        """x (B, L, d_model) at integer ``positions`` (L,) -> (B, L, d_model).

        With a ``cache`` (any cache of :mod:`helpers.kv_cache`) the keys and values join its
        layer ``layer`` and the queries attend to everything it returns.
        """
        c = self.config
        q = split_heads(self.attn.q_proj(x), c.n_heads)  # (B, H, L, D)
        k = split_heads(self.attn.k_proj(x), c.n_kv_heads)  # (B, H_kv, L, D)
        v = split_heads(self.attn.v_proj(x), c.n_kv_heads)  # (B, H_kv, L, D)
        if c.rope:
            cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_base, dtype=x.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H_kv, S, D)
        return self.attn.out_proj(merge_heads(self.attend(q, k, v)))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of q (B, H, L, D), the last L of S positions, over k, v
        (B, H_kv, S, D), with the configured kernel and window: (B, H, L, D)."""
        c = self.config
        L, S, group = q.shape[-2], k.shape[-2], c.n_heads // c.n_kv_heads
        if c.kernel == "sdpa":
            if c.window is not None and L > 1 and S > c.window:  # banded: O(L·W), no (L, S)
                return sliding_window_attention(q, repeat_kv(k, group), repeat_kv(v, group),
                                                c.window)
            return causal_gqa_attention(q, k, v, c.window)
        k, v = repeat_kv(k, group), repeat_kv(v, group)  # (B, H, S, D)
        if c.kernel == "flash":
            from helpers import flash  # lesson 06's tiled FlashAttention

            return flash.flash_attention(q, k, v, causal=True, block_q=FLASH_BLOCK,
                                         block_k=FLASH_BLOCK)
        mask = (causal_mask(L, S, device=q.device) if c.window is None
                else sliding_window_mask(L, c.window, device=q.device, S=S))  # (L, S)
        return scaled_dot_product_attention(q, k, v, mask=mask)[0]


@dataclass
class LinearAttentionState:
    """What a linear-attention layer keeps between decoding steps, the same size at any length.

    ``kv`` (B, H, F, Dv): ``Σ_j φ(k_j) v_jᵀ``; ``k_sum`` (B, H, F): ``Σ_j φ(k_j)``, the
    normaliser (Katharopoulos et al., 2020). Updated in place by :class:`LinearAttentionMixer`.
    """

    kv: torch.Tensor
    k_sum: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.kv, self.k_sum))


class LinearAttentionMixer(nn.Module):
    """Causal multi-head linear attention (Katharopoulos et al., 2020) with a decoding state.

    Without a state the whole sequence runs through :func:`helpers.linear_attention.
    linear_attention`'s chunked form; with one, the new tokens read the state (the sums over
    every earlier token) plus each other (the causal parallel form), and the state absorbs
    them: one token costs the same at any position.
    """

    def __init__(self, config: HybridConfig):
        super().__init__()
        self.config = config
        inner = config.n_heads * config.head_dim
        self.q_proj = nn.Linear(config.d_model, inner, bias=False)
        self.k_proj = nn.Linear(config.d_model, inner, bias=False)
        self.v_proj = nn.Linear(config.d_model, inner, bias=False)
        self.out_proj = nn.Linear(inner, config.d_model, bias=False)

    def empty_state(self, batch: int, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> LinearAttentionState:
        """Zero sums for ``batch`` new sequences."""
        like = self.out_proj.weight
        device, dtype = device or like.device, dtype or like.dtype
        H, D = self.config.n_heads, self.config.head_dim
        return LinearAttentionState(kv=torch.zeros(batch, H, D, D, device=device, dtype=dtype),
                                    k_sum=torch.zeros(batch, H, D, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, state: LinearAttentionState | None = None
                ) -> torch.Tensor:
        """x (B, L, d_model) -> (B, L, d_model); with a ``state``, x continues its sequence."""
        H = self.config.n_heads
        q, k, v = (split_heads(proj(x), H) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if state is None:
            out = linear_attention(q, k, v, causal=True, method="chunked")  # (B, H, L, D)
        else:
            phi_q, phi_k = elu_feature_map(q), elu_feature_map(k)  # (B, H, L, F), positive
            L = x.shape[1]
            within = phi_q @ phi_k.transpose(-2, -1) * causal_mask(L, device=x.device)
            numerator = within @ v + phi_q @ state.kv  # (B, H, L, Dv)
            normaliser = within.sum(-1) + (phi_q * state.k_sum[..., None, :]).sum(-1)  # (B, H, L)
            out = numerator / normaliser[..., None]  # > 0: every query sees itself, φ > 0
            state.kv = state.kv + phi_k.transpose(-2, -1) @ v  # (B, H, F, Dv)
            state.k_sum = state.k_sum + phi_k.sum(dim=-2)  # (B, H, F)
        return self.out_proj(merge_heads(out))


def make_mixer(kind: str, config: HybridConfig) -> nn.Module:
    """The sequence mixer of a layer of ``kind`` (A, L or M)."""
    if kind == "A":
        return AttentionMixer(config)
    if kind == "L":
        return LinearAttentionMixer(config)
    if kind == "M":
        return MambaMixer(config.d_model, config.d_state, config.d_conv, config.expand,
                          config.dt_rank)
    raise ValueError(f"layer kind {kind!r} is not one of {sorted(LAYER_KINDS)}")


# --- the cache -----------------------------------------------------------------------------


class HybridCache:
    """Everything a hybrid keeps between decoding steps, one entry per layer's slot.

    ``kv``: a KV cache (:mod:`helpers.kv_cache`) with one layer per attention layer (None
    when there are none); ``mamba``: a :class:`~helpers.ssm.MambaState` per Mamba layer;
    ``linear``: a :class:`LinearAttentionState` per linear-attention layer. ``seq_len``
    counts the tokens seen: the position of the next one, which the model advances;
    ``last_tokens`` (B, 1) is the last token seen, for a token shift (bookkeeping, like
    ``seq_len``: not counted in :attr:`nbytes`).
    """

    def __init__(self, layout: str, kv: object | None, mamba: list[MambaState],
                 linear: list[LinearAttentionState]):
        plan = layer_plan(layout)
        counts = {kind: sum(1 for k, _ in plan if k == kind) for kind in LAYER_KINDS}
        given = {"A": 0 if kv is None else kv.n_layers, "M": len(mamba), "L": len(linear)}
        if given != counts:
            raise ValueError(f"layout {layout!r} has {counts} layers of each kind, the cache "
                             f"parts hold {given}")
        self.layout, self.kv, self.mamba, self.linear = layout, kv, mamba, linear
        self.seq_len = 0
        self.last_tokens: torch.Tensor | None = None

    def nbytes_by_kind(self) -> dict[str, int]:
        """Bytes held for each kind of layer in the layout (A, L, M)."""
        held = {"A": 0 if self.kv is None else self.kv.nbytes,
                "L": sum(state.nbytes for state in self.linear),
                "M": sum(state.nbytes for state in self.mamba)}
        return {kind: held[kind] for kind in LAYER_KINDS if kind in self.layout}

    @property
    def nbytes(self) -> int:
        """Bytes of everything the cache holds."""
        return sum(self.nbytes_by_kind().values())


def decode_memory_bytes(config: HybridConfig, seq_len: int, batch: int = 1,
                        bytes_per_elem: int = 2) -> dict[str, int]:
    """Bytes a hybrid keeps to decode the next token after ``seq_len`` tokens, per layer kind.

    Attention: keys and values, ``2 · n_kv_heads · head_dim`` numbers per token it keeps (all
    ``seq_len``, or the last ``window``); linear attention: ``Σ φ(k) vᵀ`` and ``Σ φ(k)``,
    ``n_heads · (head_dim² + head_dim)``; Mamba: the convolution's last ``d_conv - 1`` inputs
    and the SSM state, ``d_inner · (d_state + d_conv - 1)``. Each times the number of such
    layers, ``batch`` and ``bytes_per_elem``. Keys: the kinds present in the layout.
    """
    c = config
    kept = seq_len if c.window is None else min(seq_len, c.window)
    per_kind = {
        "A": kv_cache_bytes(c.count("A"), c.n_kv_heads, c.head_dim, kept, batch, bytes_per_elem),
        "L": c.count("L") * batch * c.n_heads * (c.head_dim ** 2 + c.head_dim) * bytes_per_elem,
        "M": mamba_state_bytes(c.count("M"), c.d_inner, c.d_state, c.d_conv, batch,
                               bytes_per_elem),
    }
    return {kind: per_kind[kind] for kind in LAYER_KINDS if kind in c.layout}


# --- the model -----------------------------------------------------------------------------


class TokenEmbedding(nn.Module):
    """Token embeddings, and with ``token_shift`` a learned embedding of the previous token
    added to each (zero before the first): a causal convolution of width 2 over the tokens.

    It lets the position of a value know the key before it, the job of the short
    convolutions in front of the mixers of Zoology's models (Arora et al., 2023) and of
    RWKV's token shift (Peng et al., 2023, "RWKV: Reinventing RNNs for the Transformer
    Era"); a Mamba layer has one of its own (``d_conv``). Lesson 08's recall model did the
    same by concatenation.
    """

    def __init__(self, config: HybridConfig):
        super().__init__()
        self.token = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.token.weight, std=0.02)
        if config.token_shift:
            self.previous = nn.Embedding(config.vocab_size, config.d_model)
            nn.init.normal_(self.previous.weight, std=0.02)

    def forward(self, idx: torch.Tensor, cache: HybridCache | None = None) -> torch.Tensor:
        """idx (B, L) -> (B, L, d_model). With a ``cache``, idx follows its ``last_tokens``,
        which it then updates."""
        x = self.token(idx)  # (B, L, d)
        if hasattr(self, "previous"):
            before = None if cache is None else cache.last_tokens  # (B, 1) or None
            shifted = self.previous(idx if before is None else torch.cat([before, idx], dim=1))
            if before is None:  # nothing before the first token
                shifted = F.pad(shifted, (0, 0, 1, 0))
            x = x + shifted[:, :idx.shape[1]]  # (B, L, d): position t gets token t - 1
        if cache is not None:
            cache.last_tokens = idx[:, -1:]
        return x


class HybridLayer(nn.Module):
    """One layer of a hybrid, as Jamba's: ``x + mixer(norm1(x))``, then
    ``x + mlp(norm2(x))`` (RMSNorm, SwiGLU) unless the config has ``d_ff = 0``."""

    def __init__(self, kind: str, config: HybridConfig):
        super().__init__()
        self.kind = kind
        self.norm1 = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = make_mixer(kind, config)
        if config.d_ff:
            self.norm2 = RMSNorm(config.d_model, eps=config.norm_eps)
            self.mlp = SwiGLU(config.d_model, config.d_ff)

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                cache: HybridCache | None = None, slot: int = 0) -> torch.Tensor:
        """x (B, L, d_model) at ``positions`` (L,) -> (B, L, d_model).

        With a ``cache`` the layer continues from, and updates, its ``slot`` of the cache's
        part for its kind (:func:`layer_plan`).
        """
        h = self.norm1(x)
        if self.kind == "A":
            h = self.mixer(h, positions, None if cache is None else cache.kv, slot)
        elif self.kind == "L":
            h = self.mixer(h, None if cache is None else cache.linear[slot])
        else:
            h = self.mixer(h, None if cache is None else cache.mamba[slot])
        x = x + h
        if hasattr(self, "mlp"):
            x = x + self.mlp(self.norm2(x))
        return x


class Hybrid(nn.Module):
    """A language model whose layers follow a layout string: a Jamba-style hybrid
    (Lieber et al., 2024), and with ``"AAAA"``, ``"LLLL"`` or ``"MMMM"`` a transformer, a
    linear transformer or a Mamba.

    Token embeddings (:class:`TokenEmbedding`; no positions beyond RoPE in attention layers:
    the recurrent layers know the order), one :class:`HybridLayer` per character of
    ``config.layout``, a final RMSNorm and an LM head (tied to the embedding when
    ``config.tie_embeddings``).
    """

    def __init__(self, config: HybridConfig):
        super().__init__()
        self.config = config
        self.plan = layer_plan(config.layout)
        self.embedding = TokenEmbedding(config)
        self.layers = nn.ModuleList(HybridLayer(kind, config) for kind in config.layout)
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.token.weight

    @property
    def layout(self) -> str:
        return self.config.layout

    def empty_cache(self, batch: int, kv_cache: object | None = None,
                    device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None, capacity: int = 64) -> HybridCache:
        """A cache for ``batch`` new sequences: ``kv_cache`` for the attention layers, zero
        states for the others.

        By default the attention layers get one layer each of a
        :class:`~helpers.kv_cache.KVCache` with room for ``capacity`` tokens (it grows as
        needed), or, with a sliding window, Mistral's rolling buffer
        ``SinkCache(n, window, n_sinks=0)``, which keeps the last ``window`` tokens and no
        more (attention never reads further back); any cache of :mod:`helpers.kv_cache` will
        do.
        """
        n_attention, window = self.config.count("A"), self.config.window
        if kv_cache is None and n_attention:
            kv_cache = (KVCache(n_attention, capacity) if window is None
                        else SinkCache(n_attention, window=window, n_sinks=0))
        states = {"L": [], "M": []}
        for layer in self.layers:
            if layer.kind in states:
                states[layer.kind].append(layer.mixer.empty_state(batch, device, dtype))
        return HybridCache(self.layout, kv_cache if n_attention else None, states["M"],
                           states["L"])

    def random_cache(self, batch: int, seq_len: int, generator: torch.Generator | None = None
                     ) -> HybridCache:
        """A cache as if ``seq_len`` tokens had been seen: random keys, values and states.

        What a decode step costs depends on how much the cache holds, not on what: this
        measures a step at a long context without paying for the prompt first.
        """
        p = self.lm_head.weight
        cache = self.empty_cache(batch, capacity=seq_len + 64)  # room for the steps to time

        def draw(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator).to(p.device, p.dtype)

        c = self.config
        if cache.kv is not None:
            kept = seq_len if c.window is None else min(seq_len, c.window)
            positions = (None if kept == seq_len  # the window's: the last ones
                         else torch.arange(seq_len - kept, seq_len, device=p.device))
            for slot in range(c.count("A")):
                shape = (batch, c.n_kv_heads, kept, c.head_dim)
                cache.kv.update(slot, draw(*shape), draw(*shape), positions)
        for state in cache.mamba:
            state.conv, state.ssm = draw(*state.conv.shape), draw(*state.ssm.shape)
        for state in cache.linear:  # positive sums, as φ(k) > 0 makes them
            state.kv, state.k_sum = draw(*state.kv.shape), draw(*state.k_sum.shape)
        cache.seq_len = seq_len
        return cache

    def forward(self, idx: torch.Tensor, cache: HybridCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """idx (B, L) token ids -> logits (B, L, vocab_size), or (B, 1, V) when ``last_only``.

        With a ``cache`` (:meth:`empty_cache`) idx continues the sequences it holds: positions
        start at ``cache.seq_len``, every layer reads and updates its slot, and ``seq_len``
        advances by L.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx should have shape (B, L), got {tuple(idx.shape)}")
        start = 0 if cache is None else cache.seq_len
        positions = torch.arange(start, start + idx.shape[1], device=idx.device)  # (L,)
        x = self.embedding(idx, cache)  # (B, L, d_model)
        for layer, (_, slot) in zip(self.layers, self.plan):
            x = layer(x, positions, cache, slot)
        if cache is not None:
            cache.seq_len += idx.shape[1]
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))  # (B, L, V)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, use_cache: bool = True,
                 cache: HybridCache | None = None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue idx (B, L) by ``max_new_tokens`` tokens: (B, L + max_new_tokens).

        As :meth:`helpers.transformer.GPT.generate`: greedy by default (sampling as
        :func:`helpers.transformer.next_token`). With ``use_cache`` the prompt runs once and
        fills ``cache`` (:meth:`empty_cache` by default), then each new token is one step;
        without, every step reruns the whole text. A given cache that already holds the first
        tokens of idx continues after them.
        """
        if use_cache and cache is None:
            cache = self.empty_cache(idx.shape[0], capacity=idx.shape[1] + max_new_tokens)
        if use_cache and cache.seq_len >= idx.shape[1]:
            raise ValueError(f"the cache already holds {cache.seq_len} tokens but idx has only "
                             f"{idx.shape[1]}: idx must continue what the cache holds")

        def step(tokens: torch.Tensor, start: int) -> torch.Tensor:
            return self(tokens[:, start:], cache=cache if use_cache else None,
                        last_only=True)[:, -1]  # (B, V)

        return decode(step, idx, max_new_tokens, use_cache, cache.seq_len if use_cache else 0,
                      do_sample, temperature, top_k, generator)

    def decode_memory_bytes(self, seq_len: int, batch: int = 1,
                            bytes_per_elem: int | None = None) -> dict[str, int]:
        """:func:`decode_memory_bytes` for this model, in its own dtype by default."""
        size = self.lm_head.weight.element_size() if bytes_per_elem is None else bytes_per_elem
        return decode_memory_bytes(self.config, seq_len, batch, size)


# --- fair comparisons ----------------------------------------------------------------------


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, a tied weight counted once (``model.parameters()`` yields it once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def width_for_budget(build: Callable[[int], nn.Module], budget: int,
                     widths: Iterable[int]) -> int:
    """The largest width whose model, ``build(width)``, has at most ``budget`` parameters.

    Models of the same size are the first condition of a fair comparison. Raises a ValueError
    when no width fits.
    """
    fitting = [w for w in widths if count_parameters(build(w)) <= budget]
    if not fitting:
        raise ValueError(f"no width in {list(widths)} gives a model of at most {budget} "
                         f"parameters")
    return max(fitting)


def time_per_token(fns: dict[str, Callable[[], object]], n_tokens: int, repeats: int = 5,
                   warmup: int = 1, sync: Callable[[], None] | None = None,
                   clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per token of each ``fn()``, where one call handles ``n_tokens`` tokens.

    Fair to every function: ``warmup`` untimed rounds first (lazy allocations, caches);
    then ``repeats`` rounds in which the functions take turns, so that a burst of load from
    elsewhere slows them all alike; the median, which one slow round does not move; and
    ``sync()`` (e.g. ``torch.cuda.synchronize``) before each reading of the ``clock``, since
    a GPU runs asynchronously.
    """
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = clock()
            fn()
            sync()
            seconds[name].append(clock() - start)
    return {name: statistics.median(times) / n_tokens for name, times in seconds.items()}


@dataclass
class Measurement:
    """One stack at one context length: time per token and bytes, prefill and decode.

    ``prefill_s``: seconds per token to run a prompt of ``context`` tokens; ``prefill_bytes``:
    the peak tensor memory of that pass (:func:`helpers.device.peak_memory`); ``decode_s``:
    seconds for one new token after ``context`` tokens; ``cache_bytes``: what the cache holds
    then (measured, :attr:`HybridCache.nbytes`). None where not measured.
    """

    mechanism: str
    context: int
    prefill_s: float | None = None
    prefill_bytes: int | None = None
    decode_s: float | None = None
    cache_bytes: int | None = None


@torch.no_grad()
def compare_mechanisms(models: dict[str, Hybrid], contexts: Iterable[int], batch: int = 1,
                       repeats: int = 3, prefill_contexts: Iterable[int] | None = None,
                       generator: torch.Generator | None = None) -> list[Measurement]:
    """Time and memory per token of every model at every context length, measured alike.

    For each context n (and each n of ``prefill_contexts``, all of ``contexts`` by default):
    the prefill of n random tokens, timed per token with :func:`time_per_token` (the models
    take turns) and its peak memory; then one decode step after n tokens on
    :meth:`Hybrid.random_cache`, timed the same way, and the cache's bytes. The models should
    be on one device and dtype; on a CPU all run on one torch thread, so that none gets more
    cores than another (and the machine's other work disturbs them less). Returns one
    :class:`Measurement` per model and context.
    """
    contexts = list(contexts)
    prefill_contexts = set(contexts if prefill_contexts is None else prefill_contexts)
    first = next(iter(models.values())).lm_head.weight
    device = first.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    vocab = min(model.config.vocab_size for model in models.values())
    rows = []
    threads = one_cpu_thread() if device.type == "cpu" else contextlib.nullcontext()
    with threads:
        for n in sorted(set(contexts) | prefill_contexts):
            rows.extend(_measure(models, n, n in prefill_contexts, n in contexts, batch, vocab,
                                 repeats, device, sync, generator))
    return rows


def _measure(models: dict[str, Hybrid], n: int, prefill: bool, decode: bool, batch: int,
             vocab: int, repeats: int, device: torch.device, sync: Callable[[], None] | None,
             generator: torch.Generator | None) -> list[Measurement]:
    """:func:`compare_mechanisms` at one context length n."""
    measured = {name: Measurement(name, n) for name in models}
    if prefill:
        prompt = torch.randint(vocab, (batch, n), generator=generator).to(device)
        runs = {name: (lambda model=model: model(prompt, last_only=True))
                for name, model in models.items()}
        for name, seconds in time_per_token(runs, n, repeats, 1, sync).items():
            measured[name].prefill_s = seconds
            measured[name].prefill_bytes = peak_memory(runs[name], device)
    if decode:
        token = torch.randint(vocab, (batch, 1), generator=generator).to(device)
        caches = {name: model.random_cache(batch, n, generator) for name, model in models.items()}
        for name, cache in caches.items():
            measured[name].cache_bytes = cache.nbytes
        steps = {name: (lambda model=model, cache=caches[name]:
                        model(token, cache=cache, last_only=True))
                 for name, model in models.items()}
        for name, seconds in time_per_token(steps, 1, repeats, 1, sync).items():
            measured[name].decode_s = seconds
    return list(measured.values())
