"""Linear attention: a positive feature map instead of the softmax, O(n) instead of O(n²)
(lesson 08).

Katharopoulos et al. (2020), "Transformers are RNNs: Fast Autoregressive Transformers with
Linear Attention", replace the similarity ``exp(q·k)`` of softmax attention by
``φ(q)·φ(k)`` for a feature map ``φ`` with positive outputs (``elu(x) + 1`` by default). The
output of query ``i`` is then

    out_i = φ(q_i) S / φ(q_i)·z,    S = Σ_j φ(k_j) v_jᵀ  (F, Dv),   z = Σ_j φ(k_j)  (F,)

over the keys ``j`` that query ``i`` may see. The product ``φ(Q)(φ(K)ᵀV)`` is computed right
to left, so no (L, S) matrix is ever formed. Causal attention has three equal forms:

- ``"parallel"``: ``(φ(Q)φ(K)ᵀ ⊙ M) V`` normalised by its row sums, with ``M`` the causal
  mask: O(n²), all positions at once, the training form;
- ``"recurrent"``: the sums ``S`` and ``z`` carried as a state from one token to the next,
  ``S_t = S_{t-1} + φ(k_t) v_tᵀ``: an RNN again (lesson 01), O(n) time, O(1) memory per step;
- ``"chunked"``: the parallel form inside chunks of ``chunk_size`` tokens and the recurrence
  across chunks (the chunkwise form of Yang et al., 2024, "Gated Linear Attention
  Transformers with Hardware-Efficient Training"): O(n · chunk_size).

Without ``causal`` every query sees every key, ``S`` and ``z`` are sums over the whole
sequence, and all three forms reduce to ``φ(Q)(φ(K)ᵀV)``, O(n).

Shapes follow the course: q (..., L, D), k (..., S, D), v (..., S, Dv) -> out (..., L, Dv);
causal masks are aligned bottom right, as :func:`helpers.attention.causal_mask`: query ``i``
sees keys ``0 .. S - L + i``. A query whose normaliser ``φ(q)·z`` is 0 (it sees no key, or a
feature map that outputs zeros) gets a zero output, as a fully masked query in the course's
softmax attention.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from helpers.attention import causal_mask, check_qkv, merge_heads, split_heads

FeatureMap = Callable[[torch.Tensor], torch.Tensor]
METHODS = ("parallel", "recurrent", "chunked")


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """``φ(x) = elu(x) + 1`` (Katharopoulos et al., 2020), elementwise: (..., D) -> (..., D).

    Positive everywhere (``exp(x)`` below 0, ``x + 1`` above), so every similarity
    ``φ(q)·φ(k)`` is positive, like ``exp(q·k)``, and the normaliser never vanishes.
    """
    return F.elu(x) + 1


def _normalise(numerator: torch.Tensor, normaliser: torch.Tensor) -> torch.Tensor:
    """numerator (..., Dv) / normaliser (...), with 0 where the normaliser is 0."""
    normaliser = normaliser[..., None]  # (..., 1)
    safe = torch.where(normaliser == 0, torch.ones_like(normaliser), normaliser)
    return torch.where(normaliser == 0, torch.zeros_like(numerator), numerator / safe)


def parallel_linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                              causal: bool = False) -> torch.Tensor:
    """Linear attention on features, all positions at once.

    phi_q (..., L, F), phi_k (..., S, F), v (..., S, Dv) -> (..., L, Dv). Not causal:
    ``φ(Q)(φ(K)ᵀV) / φ(Q)(φ(K)ᵀ1)``, O(n). Causal: ``(φ(Q)φ(K)ᵀ ⊙ M) V`` over its row sums,
    O(n²) (bottom-right mask ``M``).
    """
    if not causal:
        state = phi_k.transpose(-2, -1) @ v  # (..., F, Dv): Σ_j φ(k_j) v_jᵀ
        z = phi_k.sum(dim=-2)  # (..., F): Σ_j φ(k_j)
        return _normalise(phi_q @ state, (phi_q * z[..., None, :]).sum(-1))
    L, S = phi_q.shape[-2], phi_k.shape[-2]
    similarity = phi_q @ phi_k.transpose(-2, -1)  # (..., L, S): φ(q_i)·φ(k_j)
    similarity = similarity * causal_mask(L, S, device=phi_q.device)
    return _normalise(similarity @ v, similarity.sum(-1))


def recurrent_linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                               causal: bool = False) -> torch.Tensor:
    """Linear attention as an RNN: the state ``(S, z)`` absorbs one key and value per step.

    ``S_t = S_{t-1} + φ(k_t) v_tᵀ``, ``z_t = z_{t-1} + φ(k_t)``, ``out_t = φ(q_t) S_t /
    φ(q_t)·z_t``: a fixed-size state (F, Dv) carries the past, as the RNN of lesson 01.
    phi_q (..., L, F), phi_k (..., S, F), v (..., S, Dv) -> (..., L, Dv). Causal, bottom
    right: query ``i`` reads the state after key ``S - L + i``. Not causal: every query reads
    the final state.
    """
    L, S = phi_q.shape[-2], phi_k.shape[-2]
    state = phi_q.new_zeros(*phi_k.shape[:-2], phi_k.shape[-1], v.shape[-1])  # (..., F, Dv)
    z = phi_q.new_zeros(*phi_k.shape[:-2], phi_k.shape[-1])  # (..., F)
    blind = phi_q.new_zeros(*phi_q.shape[:-2], v.shape[-1])  # (..., Dv): a query with no key
    outputs = [blind] * max(0, L - S)  # causal, L > S: the first L - S queries see no key
    for t in range(S):
        state = state + phi_k[..., t, :, None] * v[..., t, None, :]  # (..., F, Dv)
        z = z + phi_k[..., t, :]  # (..., F)
        query = t - (S - L)  # the query whose last visible key is t
        if causal and query >= 0:
            phi = phi_q[..., query, :]  # (..., F)
            numerator = (phi[..., None, :] @ state)[..., 0, :]  # (..., Dv): φ(q) S_t
            outputs.append(_normalise(numerator, (phi * z).sum(-1)))
    if not causal:
        return _normalise(phi_q @ state, (phi_q * z[..., None, :]).sum(-1))
    return torch.stack(outputs, dim=-2) if outputs else blind[..., None, :][..., :0, :]


def chunked_linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                             causal: bool = False, chunk_size: int = 64) -> torch.Tensor:
    """Linear attention by chunks: parallel inside a chunk, recurrent across chunks.

    The keys are cut into chunks of ``chunk_size``; chunk ``c`` sums to a state
    ``φ(K_c)ᵀV_c`` (F, Dv), and the state before chunk ``c`` is the running sum of the
    earlier ones, ``S_c = S_{c-1} + φ(K_{c-1})ᵀV_{c-1}`` (a prefix sum computes the whole
    recurrence at once). A query reads the state before its chunk plus, in parallel form,
    the keys of its own chunk that it may see. Not causal: the sum of all chunk states.
    phi_q (..., L, F), phi_k (..., S, F), v (..., S, Dv) -> (..., L, Dv).
    """
    if not causal:
        return parallel_linear_attention(phi_q, phi_k, v, causal=False)
    L, S = phi_q.shape[-2], phi_k.shape[-2]
    if L > S:  # the first L - S queries see no key: zeros, then the square case
        blind = phi_q.new_zeros(*phi_q.shape[:-2], L - S, v.shape[-1])
        return torch.cat([blind, chunked_linear_attention(phi_q[..., L - S:, :], phi_k, v,
                                                          True, chunk_size)], dim=-2)
    # queries are the last L positions of the S keys: give them rows 0 .. S - L - 1 of zeros
    phi_q = F.pad(phi_q, (0, 0, S - L, 0))  # (..., S, F)
    n_chunks = -(-S // chunk_size)
    pad = n_chunks * chunk_size - S  # zero features past the end add nothing to any state
    chunks = [F.pad(t, (0, 0, 0, pad)).unflatten(-2, (n_chunks, chunk_size))
              for t in (phi_q, phi_k, v)]  # (..., N, C, F) twice and (..., N, C, Dv)
    q_c, k_c, v_c = chunks
    within = q_c @ k_c.transpose(-2, -1)  # (..., N, C, C): similarities inside each chunk
    within = within * causal_mask(chunk_size, device=phi_q.device)
    chunk_state = k_c.transpose(-2, -1) @ v_c  # (..., N, F, Dv): φ(K_c)ᵀ V_c
    chunk_z = k_c.sum(dim=-2)  # (..., N, F)
    state_before = chunk_state.cumsum(dim=-3) - chunk_state  # (..., N, F, Dv): chunks < c
    z_before = chunk_z.cumsum(dim=-2) - chunk_z  # (..., N, F)
    numerator = within @ v_c + q_c @ state_before  # (..., N, C, Dv)
    normaliser = within.sum(-1) + (q_c * z_before[..., None, :]).sum(-1)  # (..., N, C)
    out = _normalise(numerator, normaliser).flatten(-3, -2)  # (..., N·C, Dv)
    return out[..., S - L:S, :]


FORMS = {"parallel": parallel_linear_attention, "recurrent": recurrent_linear_attention,
         "chunked": chunked_linear_attention}


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                     feature_map: FeatureMap | None = None, method: str = "parallel",
                     chunk_size: int = 64) -> torch.Tensor:
    """Linear attention (Katharopoulos et al., 2020): ``φ(Q)(φ(K)ᵀV)``, normalised.

    q (..., L, D), k (..., S, D), v (..., S, Dv) -> (..., L, Dv). ``feature_map`` maps
    (..., D) to non-negative features (..., F) (default :func:`elu_feature_map`); ``method``
    is ``"parallel"``, ``"recurrent"`` or ``"chunked"`` (see the module's docstring): all
    give the same output. ``causal`` masks bottom right, as ``helpers.attention.causal_mask``.
    No ``1/√D`` scale: a scale on ``q`` cancels between the numerator and the normaliser.
    """
    check_qkv(q, k, v)
    if method not in FORMS:
        raise ValueError(f"method should be one of {METHODS}, got {method!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size should be a positive number of tokens, got {chunk_size}")
    feature_map = elu_feature_map if feature_map is None else feature_map
    phi_q, phi_k = feature_map(q), feature_map(k)  # (..., L, F), (..., S, F)
    if phi_q.shape[-1] != phi_k.shape[-1]:
        raise ValueError(f"the feature map gave q {tuple(phi_q.shape)} and k "
                         f"{tuple(phi_k.shape)} features of different sizes")
    if bool((phi_q < 0).any()) or bool((phi_k < 0).any()):
        raise ValueError("the feature map returned negative features: linear attention needs "
                         "φ(x) >= 0 so that every similarity φ(q)·φ(k) is a weight "
                         "(elu(x) + 1 is positive; elu(x) or x alone is not)")
    if method == "chunked":
        return chunked_linear_attention(phi_q, phi_k, v, causal, chunk_size)
    return FORMS[method](phi_q, phi_k, v, causal)


class LinearAttention(nn.Module):
    """Multi-head linear attention: the projections of multi-head attention (lesson 03)
    around :func:`linear_attention`.

    x (B, L, d_model) -> (B, L, d_model); ``causal`` for a language model; ``method`` and
    ``chunk_size`` as in :func:`linear_attention` (chunked is fast for training).
    """

    def __init__(self, d_model: int, n_heads: int, causal: bool = True,
                 feature_map: FeatureMap | None = None, method: str = "chunked",
                 chunk_size: int = 64, bias: bool = True):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if method not in FORMS:
            raise ValueError(f"method should be one of {METHODS}, got {method!r}")
        self.n_heads, self.causal, self.feature_map = n_heads, causal, feature_map
        self.method, self.chunk_size = method, chunk_size
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, d_model) -> (B, L, d_model)."""
        q, k, v = (split_heads(proj(x), self.n_heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, L, D) each
        out = linear_attention(q, k, v, causal=self.causal, feature_map=self.feature_map,
                               method=self.method, chunk_size=self.chunk_size)
        return self.out_proj(merge_heads(out))
