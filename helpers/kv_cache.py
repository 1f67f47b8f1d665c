"""The KV cache (lesson 09): what autoregressive decoding keeps so that each new token costs
one row of attention instead of a rerun of the whole prefix.

Every attention layer stores the keys and values of the tokens it has seen. A decode step
computes the new token's query, key and value, appends the key and value to the cache, and
attends over everything stored. Pope et al. (2022), "Efficiently Scaling Transformer
Inference", analyse its cost; the cache's size, ``2 · layers · kv_heads · head_dim · bytes``
per token, is what grouped-query attention (lesson 07) shrinks.

Interface shared by every cache in the course (the models call only these):

- ``update(layer, k, v) -> (k_all, v_all)``: k, v (B, H_kv, T, D) are the keys and values of
  T new tokens (a prompt, or one decode step); the result is what the new queries attend to,
  everything held for that layer followed by the new tokens, (B, H_kv, S, D).
- ``held(layer)``: keys held for that layer before the next update.
- ``seq_len``: tokens seen so far, the position of the next token.
- ``nbytes``: bytes of keys and values the cache holds.
"""

from __future__ import annotations

import torch


def kv_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, seq_len: int, batch: int = 1,
                   bytes_per_elem: int = 2) -> int:
    """Bytes of a full KV cache: keys and values (2) for every layer, K/V head, channel,
    token and sequence, at ``bytes_per_elem`` each (2 for float16/bfloat16)."""
    return 2 * n_layers * n_kv_heads * head_dim * seq_len * batch * bytes_per_elem


def _check_kv(k: torch.Tensor, v: torch.Tensor) -> None:
    if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v should have shapes (B, H_kv, T, D) and (B, H_kv, T, Dv) with "
                         f"the same B, H_kv, T: got {tuple(k.shape)} and {tuple(v.shape)}")


class KVCache:
    """Keys and values of every layer in preallocated storage that grows geometrically.

    Appending T tokens writes them into free space after what is held: no copy of the past,
    unlike ``torch.cat`` (which copies everything at every step, O(n²) bytes over a
    generation). When the storage is full it doubles, so each token is copied O(1) times on
    average. ``update`` returns views of the storage, (B, H_kv, S, D).
    """

    def __init__(self, n_layers: int, capacity: int = 64):
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {n_layers}")
        self.n_layers, self.initial_capacity = n_layers, max(1, capacity)
        self._k: list[torch.Tensor | None] = [None] * n_layers
        self._v: list[torch.Tensor | None] = [None] * n_layers
        self._len = [0] * n_layers

    def _layer(self, layer: int) -> int:
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range for a cache of {self.n_layers} layers")
        return layer

    def _reserve(self, layer: int, k: torch.Tensor, v: torch.Tensor, needed: int) -> None:
        """Make room for ``needed`` tokens in ``layer``, doubling the storage when full."""
        old_k, old_v, held = self._k[layer], self._v[layer], self._len[layer]
        if old_k is not None and old_k.shape[-2] >= needed:
            return
        capacity = self.initial_capacity if old_k is None else old_k.shape[-2]
        while capacity < needed:
            capacity *= 2
        B, H, _, D = k.shape
        new_k = k.new_empty(B, H, capacity, D)  # (B, H_kv, capacity, D)
        new_v = v.new_empty(B, H, capacity, v.shape[-1])
        if old_k is not None:
            new_k[:, :, :held] = old_k[:, :, :held]
            new_v[:, :, :held] = old_v[:, :, :held]
        self._k[layer], self._v[layer] = new_k, new_v

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, H_kv, T, D) to ``layer``; return all its keys and values (B, H_kv, S, D)."""
        _check_kv(k, v)
        layer = self._layer(layer)
        held = self._len[layer]
        stored = self._k[layer]
        if stored is not None and (stored.shape[:2] != k.shape[:2] or stored.shape[-1] != k.shape[-1]):
            raise ValueError(f"layer {layer} holds keys of shape (B, H_kv, S, D) = "
                             f"{tuple(stored.shape[:2]) + ('S', stored.shape[-1])}; got new keys "
                             f"{tuple(k.shape)}")
        end = held + k.shape[-2]
        self._reserve(layer, k, v, end)
        self._k[layer][:, :, held:end] = k
        self._v[layer][:, :, held:end] = v
        self._len[layer] = end
        return self._k[layer][:, :, :end], self._v[layer][:, :, :end]

    def held(self, layer: int = 0) -> int:
        """Number of tokens whose keys and values ``layer`` holds."""
        return self._len[self._layer(layer)]

    @property
    def seq_len(self) -> int:
        """Tokens seen so far: the position the next token gets."""
        return self._len[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values held (not of the spare capacity)."""
        total = 0
        for k, v, held in zip(self._k, self._v, self._len):
            if k is not None:
                total += held * (k[:, :, 0].numel() * k.element_size()
                                 + v[:, :, 0].numel() * v.element_size())
        return total

    @property
    def allocated_nbytes(self) -> int:
        """Bytes of the storage, spare capacity included."""
        return sum(t.numel() * t.element_size() for t in self._k + self._v if t is not None)
