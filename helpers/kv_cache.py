"""The KV cache (lesson 09): what autoregressive decoding keeps so that each new token costs
one row of attention instead of a rerun of the whole prefix, and four ways to keep it.

Every attention layer stores the keys and values of the tokens it has seen. A decode step
computes the new token's query, key and value, appends the key and value to the cache, and
attends over everything stored. Pope et al. (2022), "Efficiently Scaling Transformer
Inference", analyse its cost; the cache's size, ``2 · layers · kv_heads · head_dim · bytes``
per token, is what grouped-query attention (lesson 07) shrinks and what the compressed caches
here shrink further:

- :class:`KVCache`: everything, in preallocated storage that grows geometrically.
- :class:`QuantizedKVCache`: KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit
  Quantization for KV Cache"): keys quantized per channel, values per token, the most
  recent tokens in full precision.
- :class:`SinkCache`: StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models
  with Attention Sinks"): the first ``n_sinks`` tokens and a window of recent ones; with
  ``n_sinks=0`` it is the rolling-buffer cache of Mistral (Jiang et al., 2023, "Mistral 7B").
- :class:`HeavyHitterCache`: H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for
  Efficient Generative Inference of Large Language Models"): the recent tokens and those
  that received the most attention so far.

Interface shared by every cache (the models call only the first three):

- ``update(layer, k, v, positions=None) -> (k_all, v_all)``: k, v (B, H_kv, T, D) are the
  keys and values of T new tokens (a prompt, or one decode step); the result is what the new
  queries attend to, everything held for that layer followed by the new tokens,
  (B, H_kv, S, D). Then the cache compresses or evicts down to its budget. ``positions``
  (B, T) gives each new token's position in its own sequence, ``-1`` for left padding (a
  batch of prompts of different lengths); by default they continue ``0, 1, 2, ...``.
- ``held(layer)``: tokens held for that layer before the next update.
- ``seq_len``: tokens seen so far, the position of the next token.
- ``positions(layer)``: positions of the held tokens, broadcastable to (B, H_kv, held); a
  model masks the keys whose position is negative (padding).
- ``nbytes``: bytes of what the cache keeps for keys and values: the tensors themselves,
  packed 4-bit codes, quantization scales and zero points, H2O's attention scores (not the
  integer positions, bookkeeping that a real server derives from the sequence length).
- ``needs_attention_weights``: True for a cache that evicts by attention (H2O): the model
  then computes the step's weights (B, H, L, S) and hands them over with
  ``record_attention(layer, weights)``; every other cache lets the model use a fused kernel
  that never materialises them.
"""

from __future__ import annotations

import torch

from helpers.tasks import IGNORE_INDEX

# --- memory ---------------------------------------------------------------------------------


def kv_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, seq_len: int, batch: int = 1,
                   bytes_per_elem: int = 2) -> int:
    """Bytes of a full KV cache: keys and values (2) for every layer, K/V head, channel,
    token and sequence, at ``bytes_per_elem`` each (2 for float16/bfloat16)."""
    return 2 * n_layers * n_kv_heads * head_dim * seq_len * batch * bytes_per_elem


# --- quantization (KIVI) --------------------------------------------------------------------


def quantize(x: torch.Tensor, dim: int, bits: int = 8
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max quantization, one scale and zero point per slice along ``dim``.

    ``scale = (max - min) / (2^bits - 1)``, ``zero = min``, ``codes = round((x - zero) /
    scale)`` in ``0 .. 2^bits - 1`` (uint8), so ``|x - dequantize(...)| <= scale / 2``
    (Jacob et al., 2018, "Quantization and Training of Neural Networks for Efficient
    Integer-Arithmetic-Only Inference"). KIVI quantizes keys per channel (``dim`` = the
    token axis, -2: one scale per channel) and values per token (``dim=-1``). Returns codes
    (shape of x), scale and zero (x's shape with ``dim`` of size 1, x's dtype). A constant
    slice gets scale 0 and is reproduced exactly.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits should be between 1 and 8 (codes are uint8), got {bits}")
    levels = 2**bits - 1
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x32 = x.to(compute)
    low, high = x32.amin(dim=dim, keepdim=True), x32.amax(dim=dim, keepdim=True)
    scale = (high - low) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant slice: codes 0
    codes = ((x32 - low) / safe).round().clamp(0, levels).to(torch.uint8)
    return codes, scale.to(x.dtype), low.to(x.dtype)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``codes * scale + zero`` in the dtype of ``scale``: the inverse of :func:`quantize`."""
    return codes.to(scale.dtype) * scale + zero


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: (..., D) uint8 in 0..15 -> (..., D / 2), even index low."""
    if codes.shape[-1] % 2:
        raise ValueError(f"4-bit packing pairs the last dim: it must be even, got {codes.shape[-1]}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(..., D / 2) uint8 -> (..., D) codes in 0..15: the inverse of :func:`pack_int4`."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


# --- which tokens an evicting cache keeps ---------------------------------------------------


def sink_window_keep(positions: torch.Tensor, window: int, n_sinks: int) -> torch.Tensor:
    """Indices (..., K) of the keys StreamingLLM keeps, in order, from positions (..., S).

    A key stays when it is one of the first ``n_sinks`` tokens of its sequence (position
    ``< n_sinks``) or one of the last ``window`` (position ``> newest - window``); padding
    (position -1) goes first. K = ``min(S, n_sinks + window)``, the same in every row, so a
    row with fewer tokens keeps some padding too.
    """
    S = positions.shape[-1]
    K = min(S, n_sinks + window)
    newest = positions.amax(dim=-1, keepdim=True)  # (..., 1)
    wanted = (positions >= 0) & ((positions < n_sinks) | (positions > newest - window))
    slot = torch.arange(S, device=positions.device)
    score = wanted.long() * S + slot  # wanted keys first; ties broken by slot
    return score.topk(K, dim=-1).indices.sort(dim=-1).values


def heavy_hitter_keep(scores: torch.Tensor, positions: torch.Tensor, budget: int,
                      n_recent: int) -> torch.Tensor:
    """Indices (..., K) of the keys H2O keeps, in order, from accumulated attention scores.

    scores, positions (..., S). The ``n_recent`` newest tokens always stay; the rest of the
    ``budget`` goes to the tokens with the largest accumulated attention, the "heavy
    hitters" (Zhang et al., 2023); padding (position -1) goes first. K = ``min(S, budget)``.
    """
    S = scores.shape[-1]
    K = min(S, budget)
    newest = positions.amax(dim=-1, keepdim=True)  # (..., 1)
    priority = torch.where(positions > newest - n_recent, float("inf"), scores.float())
    priority = torch.where(positions < 0, float("-inf"), priority)
    return priority.topk(K, dim=-1).indices.sort(dim=-1).values


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, ...) at token indices (B or 1, H or 1, K) -> (B, H, K, ...)."""
    B, H = x.shape[:2]
    index = index.expand(B, H, index.shape[-1])
    index = index.reshape(*index.shape, *([1] * (x.dim() - 3))).expand(B, H, -1, *x.shape[3:])
    return x.gather(2, index)


# --- the caches -----------------------------------------------------------------------------


def _check_kv(k: torch.Tensor, v: torch.Tensor) -> None:
    if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v should have shapes (B, H_kv, T, D) and (B, H_kv, T, Dv) with "
                         f"the same B, H_kv, T: got {tuple(k.shape)} and {tuple(v.shape)}")


def _nbytes(tensors: object) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class _Growing:
    """One tensor filled along dim 2 in preallocated storage that doubles when full."""

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.data: torch.Tensor | None = None

    def append(self, x: torch.Tensor) -> torch.Tensor:
        """Write x (B, H, T, ...) after what is held; return all of it, a view (B, H, n, ...)."""
        end = self.length + x.shape[2]
        if self.data is None or self.data.shape[2] < end:
            capacity = self.capacity if self.data is None else self.data.shape[2]
            while capacity < end:
                capacity *= 2
            grown = x.new_empty(*x.shape[:2], capacity, *x.shape[3:])
            if self.data is not None:
                grown[:, :, :self.length] = self.data[:, :, :self.length]
            self.data = grown
        self.data[:, :, self.length:end] = x
        self.length = end
        return self.data[:, :, :end]

    def view(self) -> torch.Tensor | None:
        return None if self.data is None else self.data[:, :, :self.length]


class _Cache:
    """What every cache shares: layers, tokens seen, positions, and bytes from ``stored``."""

    needs_attention_weights = False

    def __init__(self, n_layers: int):
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {n_layers}")
        self.n_layers = n_layers
        self._seen = [0] * n_layers
        self._device: torch.device | None = None  # of the keys stored

    def _layer(self, layer: int) -> int:
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range for a cache of {self.n_layers} layers")
        return layer

    def _new_positions(self, layer: int, k: torch.Tensor, positions: torch.Tensor | None
                       ) -> torch.Tensor:
        """Positions (B or 1, 1, T) of the T new tokens: the given ones, or the next ones."""
        B, T = k.shape[0], k.shape[2]
        if positions is None:
            start = self._seen[layer]
            return torch.arange(start, start + T, device=k.device)[None, None]
        if positions.shape not in ((B, T), (T,)):
            raise ValueError(f"positions should have shape (B, T) = {(B, T)}, got "
                             f"{tuple(positions.shape)}")
        return positions.to(k.device, torch.long).expand(B, T)[:, None]

    @property
    def seq_len(self) -> int:
        """Tokens seen so far: the position the next token gets."""
        return self._seen[0]

    def stored(self, layer: int = 0) -> dict[str, torch.Tensor]:
        """The tensors the cache keeps for ``layer``, by name (what :attr:`nbytes` counts)."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of everything :meth:`stored` holds, over all layers (not spare capacity)."""
        return sum(_nbytes(self.stored(layer).values()) for layer in range(self.n_layers))


class _AppendingCache(_Cache):
    """A cache that keeps every token: held = seen; positions are kept once a batch is padded."""

    def __init__(self, n_layers: int, capacity: int):
        super().__init__(n_layers)
        self.capacity = max(1, capacity)
        self._pos: list[_Growing | None] = [None] * n_layers

    def _record_positions(self, layer: int, k: torch.Tensor, positions: torch.Tensor | None
                          ) -> None:
        """Per-sequence positions, kept from the first padded update on (the past's then too)."""
        self._device = k.device
        if positions is None and self._pos[layer] is None:
            return  # positions are 0, 1, 2, ... for every sequence: nothing to keep
        B, held = k.shape[0], self._seen[layer]
        if self._pos[layer] is None:
            self._pos[layer] = _Growing(self.capacity)
            if held:
                self._pos[layer].append(torch.arange(held, device=k.device).expand(B, 1, held))
        self._pos[layer].append(self._new_positions(layer, k, positions).expand(B, 1, -1))

    def positions(self, layer: int = 0) -> torch.Tensor:
        """Positions of the held tokens, (B or 1, 1, held); -1 marks padding."""
        layer = self._layer(layer)
        if self._pos[layer] is not None:
            return self._pos[layer].view()
        return torch.arange(self._seen[layer], device=self._device)[None, None]

    def held(self, layer: int = 0) -> int:
        """Number of tokens whose keys and values ``layer`` holds: all it has seen."""
        return self._seen[self._layer(layer)]


class KVCache(_AppendingCache):
    """Keys and values of every layer in preallocated storage that grows geometrically.

    Appending T tokens writes them into free space after what is held: no copy of the past,
    unlike ``torch.cat`` (which copies everything at every step, O(n²) bytes over a
    generation). When the storage is full it doubles, so each token is copied O(1) times on
    average; give ``capacity`` = the final length and it is never copied. ``update`` returns
    views of the storage, (B, H_kv, S, D).
    """

    def __init__(self, n_layers: int, capacity: int = 64):
        super().__init__(n_layers, capacity)
        self._k = [_Growing(self.capacity) for _ in range(n_layers)]
        self._v = [_Growing(self.capacity) for _ in range(n_layers)]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, H_kv, T, D) to ``layer``; return all its keys and values (B, H_kv, S, D)."""
        _check_kv(k, v)
        keys = self._k[self._layer(layer)].data
        if keys is not None and (keys.shape[:2] != k.shape[:2] or keys.shape[3] != k.shape[3]):
            raise ValueError(f"layer {layer} holds keys of shape (B, H_kv, S, D) = "
                             f"{tuple(keys.shape[:2]) + ('S', keys.shape[3])}; got new keys "
                             f"{tuple(k.shape)}")
        self._record_positions(layer, k, positions)
        self._seen[layer] += k.shape[2]
        return self._k[layer].append(k), self._v[layer].append(v)

    def stored(self, layer: int = 0) -> dict[str, torch.Tensor]:
        """keys (B, H_kv, held, D) and values (B, H_kv, held, Dv): views of the storage."""
        layer = self._layer(layer)
        if self._k[layer].data is None:
            return {}
        return {"keys": self._k[layer].view(), "values": self._v[layer].view()}

    @property
    def allocated_nbytes(self) -> int:
        """Bytes of the storage, spare capacity included."""
        return _nbytes(growing.data for growing in self._k + self._v)


class QuantizedKVCache(_AppendingCache):
    """KIVI (Liu et al., 2024): keys quantized per channel, values per token, recent in full.

    The outliers of keys sit in a few fixed channels, so each channel gets its own scale,
    computed over a group of ``residual`` tokens; values have no such channels, and each
    token gets its own scale. Keys wait in full precision until a group of ``residual`` is
    complete; the last ``residual`` values stay in full precision, older ones are quantized
    one token at a time. ``bits=4`` packs two codes per byte (:func:`pack_int4`); scales and
    zero points keep the dtype of the keys. ``update`` returns the dequantized past followed
    by the new tokens in full precision.
    """

    PARTS = ("key_codes", "key_scales", "key_zeros", "value_codes", "value_scales",
             "value_zeros")

    def __init__(self, n_layers: int, bits: int = 8, residual: int = 32, capacity: int = 64):
        super().__init__(n_layers, capacity)
        if bits not in (4, 8):
            raise ValueError(f"bits should be 8 or 4, got {bits}")
        if residual < 1:
            raise ValueError(f"residual (the key group size) must be at least 1, got {residual}")
        self.bits, self.residual = bits, residual
        self._parts = [{name: _Growing(self.capacity) for name in self.PARTS}
                       for _ in range(n_layers)]
        self._recent: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_int4(codes) if self.bits == 4 else codes

    def _unpack(self, codes: torch.Tensor) -> torch.Tensor:
        return unpack_int4(codes) if self.bits == 4 else codes

    def dequantized(self, layer: int = 0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The quantized keys (B, H_kv, n_k, D) and values (B, H_kv, n_v, D), dequantized."""
        part = {name: growing.view() for name, growing in self._parts[self._layer(layer)].items()}
        keys = values = None
        if part["key_codes"] is not None:
            codes = self._unpack(part["key_codes"])  # (B, H, G * R, D)
            B, H, n, D = codes.shape
            groups = codes.reshape(B, H, n // self.residual, self.residual, D)  # (B, H, G, R, D)
            keys = dequantize(groups, part["key_scales"][:, :, :, None],
                              part["key_zeros"][:, :, :, None]).reshape(B, H, n, D)
        if part["value_codes"] is not None:
            values = dequantize(self._unpack(part["value_codes"]), part["value_scales"],
                                part["value_zeros"])
        return keys, values

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the dequantized past and the new k, v (B, H_kv, S, D); then quantize."""
        _check_kv(k, v)
        layer = self._layer(layer)
        if self.bits == 4 and (k.shape[-1] % 2 or v.shape[-1] % 2):
            raise ValueError(f"4-bit codes are packed in pairs: head_dim must be even, got "
                             f"{k.shape[-1]} and {v.shape[-1]}")
        self._record_positions(layer, k, positions)
        self._seen[layer] += k.shape[2]
        old_k, old_v = self.dequantized(layer)
        k_recent, v_recent = k, v
        if self._recent[layer] is not None:
            k_recent = torch.cat([self._recent[layer][0], k], dim=2)
            v_recent = torch.cat([self._recent[layer][1], v], dim=2)
        k_all = k_recent if old_k is None else torch.cat([old_k, k_recent], dim=2)
        v_all = v_recent if old_v is None else torch.cat([old_v, v_recent], dim=2)
        self._compress(layer, k_recent, v_recent)
        return k_all, v_all

    def _compress(self, layer: int, k_recent: torch.Tensor, v_recent: torch.Tensor) -> None:
        """Quantize the complete key groups and the values that left the recent window."""
        part = self._parts[layer]
        B, H, n, D = k_recent.shape
        full = n // self.residual * self.residual  # keys in complete groups
        if full:
            groups = k_recent[:, :, :full].reshape(B, H, full // self.residual, self.residual, D)
            codes, scale, zero = quantize(groups, dim=-2, bits=self.bits)  # one scale per channel
            part["key_codes"].append(self._pack(codes.reshape(B, H, full, D)))
            part["key_scales"].append(scale[:, :, :, 0])  # (B, H, G, D)
            part["key_zeros"].append(zero[:, :, :, 0])
        old = max(0, v_recent.shape[2] - self.residual)  # values leaving the recent window
        if old:
            codes, scale, zero = quantize(v_recent[:, :, :old], dim=-1, bits=self.bits)
            part["value_codes"].append(self._pack(codes))
            part["value_scales"].append(scale)  # (B, H, n, 1): one scale per token
            part["value_zeros"].append(zero)
        self._recent[layer] = (k_recent[:, :, full:].clone(), v_recent[:, :, old:].clone())

    def stored(self, layer: int = 0) -> dict[str, torch.Tensor]:
        """Codes (uint8; two per byte at 4 bits), scales and zero points of the quantized keys
        (one per channel and group) and values (one per token), and the recent tokens."""
        layer = self._layer(layer)
        if self._recent[layer] is None:
            return {}
        parts = {name: growing.view() for name, growing in self._parts[layer].items()
                 if growing.data is not None}
        return {**parts, "recent_keys": self._recent[layer][0],
                "recent_values": self._recent[layer][1]}


class _EvictingCache(_Cache):
    """A cache with a budget: ``update`` returns held + new, then keeps only part of them."""

    def __init__(self, n_layers: int):
        super().__init__(n_layers)
        self._k: list[torch.Tensor | None] = [None] * n_layers
        self._v: list[torch.Tensor | None] = [None] * n_layers
        self._pos: list[torch.Tensor | None] = [None] * n_layers  # (B or 1, H or 1, S)

    def _append(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        _check_kv(k, v)
        new = self._new_positions(layer, k, positions)  # (B or 1, 1, T)
        self._seen[layer] += k.shape[2]
        self._device = k.device
        if self._k[layer] is None:
            self._k[layer], self._v[layer], self._pos[layer] = k, v, new
        else:
            held = self._pos[layer]
            B, H = max(held.shape[0], new.shape[0]), held.shape[1]
            self._pos[layer] = torch.cat([held.expand(B, H, -1), new.expand(B, H, -1)], dim=2)
            self._k[layer] = torch.cat([self._k[layer], k], dim=2)
            self._v[layer] = torch.cat([self._v[layer], v], dim=2)
        return self._k[layer], self._v[layer]

    def _evict(self, layer: int, keep: torch.Tensor) -> None:
        """Keep only the tokens at indices ``keep`` (B or 1, H_kv or 1, K)."""
        self._k[layer] = gather_tokens(self._k[layer], keep)
        self._v[layer] = gather_tokens(self._v[layer], keep)
        self._pos[layer] = self._pos[layer].expand(*keep.shape[:2], -1).gather(2, keep)

    def positions(self, layer: int = 0) -> torch.Tensor:
        """Positions of the held tokens, (B or 1, H_kv or 1, held); -1 marks padding."""
        layer = self._layer(layer)
        if self._pos[layer] is None:
            return torch.zeros(1, 1, 0, dtype=torch.long, device=self._device)
        return self._pos[layer]

    def held(self, layer: int = 0) -> int:
        layer = self._layer(layer)
        return 0 if self._k[layer] is None else self._k[layer].shape[2]

    def stored(self, layer: int = 0) -> dict[str, torch.Tensor]:
        """keys (B, H_kv, held, D) and values (B, H_kv, held, Dv) of the tokens kept."""
        layer = self._layer(layer)
        if self._k[layer] is None:
            return {}
        return {"keys": self._k[layer], "values": self._v[layer]}


class SinkCache(_EvictingCache):
    """StreamingLLM (Xiao et al., 2023): the first ``n_sinks`` tokens and the last ``window``.

    Softmax attention must put its weight somewhere; trained models dump the surplus on the
    first tokens, which every query sees, the "attention sinks". Evicting them, as a plain
    sliding window does, breaks the model; keeping four of them restores it. After each
    update the cache holds at most ``n_sinks + window`` tokens. With ``n_sinks=0`` it is
    Mistral's rolling-buffer cache (Jiang et al., 2023).
    """

    def __init__(self, n_layers: int, window: int, n_sinks: int = 4):
        super().__init__(n_layers)
        if window < 1 or n_sinks < 0:
            raise ValueError(f"window must be at least 1 and n_sinks at least 0, got "
                             f"window={window}, n_sinks={n_sinks}")
        self.window, self.n_sinks = window, n_sinks

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return held + new k, v (B, H_kv, S, D); then keep the sinks and the window."""
        k_all, v_all = self._append(self._layer(layer), k, v, positions)
        if self.held(layer) > self.n_sinks + self.window:
            self._evict(layer, sink_window_keep(self._pos[layer], self.window, self.n_sinks))
        return k_all, v_all


class HeavyHitterCache(_EvictingCache):
    """H2O (Zhang et al., 2023): the ``n_recent`` newest tokens and the heaviest hitters.

    A few tokens receive most of the attention, over and over; their accumulated attention
    (summed over queries and over the query heads that share a K/V head) predicts that they
    will be needed again. After the model hands the step's attention weights over
    (:meth:`record_attention`), the cache keeps ``budget`` tokens: the newest ``n_recent``
    and those with the largest accumulated attention, each K/V head its own.
    """

    needs_attention_weights = True

    def __init__(self, n_layers: int, budget: int, n_recent: int):
        super().__init__(n_layers)
        if not 0 <= n_recent <= budget or budget < 1:
            raise ValueError(f"need 0 <= n_recent <= budget and budget >= 1, got "
                             f"budget={budget}, n_recent={n_recent}")
        self.budget, self.n_recent = budget, n_recent
        self._scores: list[torch.Tensor | None] = [None] * n_layers  # (B, H_kv, S)
        self._waiting = [False] * n_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return held + new k, v (B, H_kv, S, D); eviction waits for the attention weights."""
        if self._waiting[self._layer(layer)]:
            raise RuntimeError(f"layer {layer} got no attention weights for its last update: "
                               "a model using HeavyHitterCache must call "
                               "cache.record_attention(layer, weights) after attending")
        self._waiting[layer] = True
        return self._append(layer, k, v, positions)

    def record_attention(self, layer: int, weights: torch.Tensor) -> None:
        """Add this step's weights (B, H, L, S) to the scores, then evict down to the budget."""
        layer = self._layer(layer)
        B, H_kv, S = self._k[layer].shape[:3]
        if weights.dim() != 4 or weights.shape[0] != B or weights.shape[3] != S \
                or weights.shape[1] % H_kv:
            raise ValueError(f"weights should have shape (B, H, L, S) with B = {B}, S = {S} "
                             f"and H a multiple of H_kv = {H_kv}, got {tuple(weights.shape)}")
        received = weights.float().sum(dim=2)  # (B, H, S): summed over the queries
        received = received.reshape(B, H_kv, -1, S).sum(dim=2)  # (B, H_kv, S): over the group
        if self._scores[layer] is not None:
            old = self._scores[layer]
            received[:, :, :old.shape[2]] += old
        self._scores[layer], self._waiting[layer] = received, False
        if S > self.budget:
            positions = self._pos[layer].expand(B, H_kv, S)
            keep = heavy_hitter_keep(received, positions, self.budget, self.n_recent)
            self._evict(layer, keep)
            self._scores[layer] = received.gather(2, keep)

    def stored(self, layer: int = 0) -> dict[str, torch.Tensor]:
        """keys and values of the tokens kept, and their accumulated scores (B, H_kv, held)."""
        stored = super().stored(layer)
        if self._scores[layer] is not None:
            stored["scores"] = self._scores[layer]
        return stored


# --- the experiment: quality of generation through a cache -----------------------------------


@torch.no_grad()
def teacher_forced_logits(model: torch.nn.Module, tokens: torch.Tensor, cache: object,
                          prefill: int = 1) -> torch.Tensor:
    """Logits (B, L, V) for tokens (B, L) fed through ``cache`` as generation feeds them.

    The first ``prefill`` tokens go in at once, then one token per step, so that the cache
    compresses or evicts between steps exactly as it would while generating; the model
    sees the true tokens (teacher forcing), so every position can be scored.
    """
    logits = [model(tokens[:, :prefill], cache=cache)]
    for t in range(prefill, tokens.shape[1]):
        logits.append(model(tokens[:, t:t + 1], cache=cache))
    return torch.cat(logits, dim=1)


def cache_accuracy(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                   cache: object, prefill: int = 1, scored_from: int = 0) -> float:
    """Share of the scored targets (not ``IGNORE_INDEX``) at positions ``>= scored_from``
    that the model predicts (argmax) when the tokens go through ``cache`` one by one."""
    logits = teacher_forced_logits(model, inputs, cache, prefill)  # (B, L, V)
    scored = targets != IGNORE_INDEX  # (B, L)
    scored[:, :scored_from] = False
    right = (logits.argmax(dim=-1) == targets) & scored
    return float(right.sum() / scored.sum())
