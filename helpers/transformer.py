"""Transformer blocks and the model families built from them: BERT, GPT, T5 (lesson 05) and
the Llama family (lesson 07).

One :class:`TransformerBlock` with a few options covers all three families:

- GPT-2 (Radford et al., 2019, "Language Models are Unsupervised Multitask Learners"):
  pre-LayerNorm, causal self-attention, GELU (tanh approximation) feed-forward, learned
  positions, LM head tied to the token embedding. The block's defaults are this block.
- BERT (Devlin et al., 2019, "BERT: Pre-training of Deep Bidirectional Transformers for
  Language Understanding"): post-LayerNorm, bidirectional self-attention, token-type
  embeddings, a masked-language-model head.
- T5 (Raffel et al., 2020, "Exploring the Limits of Transfer Learning with a Unified
  Text-to-Text Transformer"): encoder-decoder, RMS norm without bias, no biases anywhere, no
  ``1/sqrt(d)`` in attention, ReLU feed-forward, and a learned relative position bias in
  place of absolute positions (after Shaw et al., 2018, "Self-Attention with Relative
  Position Representations").
- Llama (Touvron et al., 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models") and
  Mistral (Jiang et al., 2023, "Mistral 7B"): pre-RMSNorm blocks without biases, rotary
  position embeddings (:mod:`helpers.rope`), a SwiGLU feed-forward, grouped-query attention,
  and for Mistral a sliding window. :class:`Llama` is its own small block, :class:`LlamaBlock`.

Every model has ``from_hf(hf_model)``, which copies the weights of the matching Hugging Face
``transformers`` model; the tests prove that the logits then agree. ``transformers`` is never
imported here: ``from_hf`` only reads the object it is given.

Attention itself comes from :mod:`helpers.attention`: ``MultiHeadAttention`` holds the
projections, and :func:`attention` below runs them with the two things its ``forward`` does
not take, T5's scale of 1 and a K/V cache for generation (:mod:`helpers.kv_cache`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

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
from helpers.kv_cache import KVCache, SinkCache
from helpers.tasks import IGNORE_INDEX
from helpers.rope import apply_rope, rope_cos_sin

ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),  # exact erf GELU (BERT)
    "gelu_new": lambda: nn.GELU(approximate="tanh"),  # GPT-2's tanh approximation
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": lambda: nn.ReLU(),  # T5
    "silu": lambda: nn.SiLU(),  # Llama and Mistral's SwiGLU gate
}


def make_activation(name: str) -> nn.Module:
    """The feed-forward non-linearity called ``name`` (Hugging Face's names for them)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; use one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) * weight``: LayerNorm without the mean and the bias (T5).

    Zhang & Sennrich (2019), "Root Mean Square Layer Normalization"; T5 computes the mean
    square in float32 even for half-precision inputs, and so do we (float64 stays float64).
    """

    def __init__(self, d_model: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))  # at least float32
        normed = wide * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def make_norm(kind: str, d_model: int, eps: float) -> nn.Module:
    """``"layer"`` (LayerNorm, GPT-2 and BERT) or ``"rms"`` (RMSNorm, T5)."""
    if kind == "layer":
        return nn.LayerNorm(d_model, eps=eps)
    if kind == "rms":
        return RMSNorm(d_model, eps=eps)
    raise ValueError(f"norm should be 'layer' or 'rms', got {kind!r}")


def attention(attn: MultiHeadAttention, x: torch.Tensor, context: torch.Tensor | None = None,
              mask: torch.Tensor | None = None, scale: float | None = None,
              cache: KVCache | None = None, layer: int = 0,
              positions: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """Multi-head attention through ``attn``'s projections, with a ``scale`` and a K/V cache.

    x (B, L, d_model) attends to ``context`` (B, S, d_model), itself by default; ``mask`` is
    boolean (True = attend) or an additive float bias, broadcast to (B, H, L, S'), where S'
    counts the cached keys too; ``is_causal`` (no mask, nothing cached) lets the fused kernel
    apply the causal mask itself. ``scale`` defaults to ``1/sqrt(head_dim)``; T5 uses 1.
    ``cache`` (any cache of :mod:`helpers.kv_cache`) keeps the keys and values of earlier
    positions in its layer ``layer``; ``positions`` (B, L), each token's position in its own
    sequence with -1 for padding, go to the cache, and padding keys are masked wherever the
    cache keeps them. PyTorch's fused kernel computes the attention, unless the cache evicts
    by attention weights (H2O): then the reference materialises them and hands them over.
    Returns (B, L, d_model), equal to ``attn(x, context, mask)`` when scale and cache are None.
    """
    context = x if context is None else context
    q = split_heads(attn.q_proj(x), attn.n_heads)  # (B, H, L, D)
    k = split_heads(attn.k_proj(context), attn.n_kv_heads)  # (B, H_kv, S, D)
    v = split_heads(attn.v_proj(context), attn.n_kv_heads)  # (B, H_kv, S, D)
    group = attn.n_heads // attn.n_kv_heads
    if cache is not None and positions is not None:
        real = _real_keys(cache.positions(layer), positions)  # (B, 1 or H_kv, 1, S')
        real = real.repeat_interleave(group, dim=1) if real.shape[1] > 1 else real
        mask = real if mask is None else mask & real
        k, v = cache.update(layer, k, v, positions=positions)  # (B, H_kv, S', D)
    elif cache is not None:
        k, v = cache.update(layer, k, v)  # (B, H_kv, S', D)
    if cache is None or not getattr(cache, "needs_attention_weights", False):
        return attn.out_proj(merge_heads(_fused_sdpa(q, k, v, mask, scale, is_causal)))
    if is_causal:
        mask = causal_mask(q.shape[2], k.shape[2], device=q.device)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, S', D)
    out, weights = scaled_dot_product_attention(q, k, v, mask=mask, scale=scale)  # (B, H, L, D)
    cache.record_attention(layer, weights)
    return attn.out_proj(merge_heads(out))


def _real_keys(held: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """(B, 1 or H_kv, 1, S) True for the keys that are tokens, not padding: from the positions
    of the held keys (B or 1, 1 or H_kv, S_held) and of the new tokens (B, L), -1 = padding."""
    B, heads = new.shape[0], held.shape[1]
    keys = new[:, None, :].expand(B, heads, -1)  # (B, heads, L)
    if held.shape[-1]:
        keys = torch.cat([held.expand(B, heads, -1), keys], dim=-1)  # (B, heads, S)
    return (keys >= 0)[:, :, None, :]


def _fused_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                scale: float | None, is_causal: bool) -> torch.Tensor:
    """PyTorch's fused SDPA, (B, H, L, Dv), K/V heads shared by groups of query heads.

    A query row whose mask allows no key (a padding token) gives zeros, as the reference
    does, whatever the PyTorch version: such rows attend everywhere, then are zeroed.
    """
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, **gqa)
    allowed = mask if mask.dtype == torch.bool else ~torch.isneginf(mask)
    has_key = allowed.any(dim=-1, keepdim=True)  # (..., L, 1)
    safe = mask | ~has_key if mask.dtype == torch.bool else mask.masked_fill(~has_key, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe, scale=scale, **gqa)
    return torch.where(has_key, out, torch.zeros_like(out))


def add_bias(mask: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor | None:
    """One attention mask from a boolean ``mask`` (True = attend) and an additive ``bias``.

    Both broadcast to (B, H, L, S); the result is the bias with ``-inf`` where the mask says
    no, or whichever of the two is given.
    """
    if bias is None:
        return mask
    if mask is None:
        return bias
    return torch.where(mask, bias, torch.full_like(bias, float("-inf")))


class TransformerBlock(nn.Module):
    """One transformer layer: self-attention, optional cross-attention, feed-forward.

    The defaults are GPT-2's pre-LayerNorm block (Radford et al., 2019; Xiong et al., 2020,
    "On Layer Normalization in the Transformer Architecture")::

        x = x + attn(norm1(x))
        x = x + cross_attn(norm_cross(x), context)    # when cross_attention
        x = x + mlp(norm2(x))

    ``norm_first=False`` gives the original post-LayerNorm block of Vaswani et al. (2017) and
    BERT, ``x = norm1(x + attn(x))`` and so on. The other options serve the model families:
    ``activation`` (``"gelu"``, ``"gelu_new"``, ``"relu"``), ``bias`` (T5 has none), ``norm``
    (``"layer"`` or ``"rms"``), ``norm_eps``, and ``attn_scale`` (T5: 1.0). Dropout acts on
    each branch's output before it joins the residual stream.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int | None = None,
                 causal: bool = False, cross_attention: bool = False, dropout: float = 0.0,
                 *, norm_first: bool = True, activation: str = "gelu", bias: bool = True,
                 norm: str = "layer", norm_eps: float = 1e-5,
                 attn_scale: float | None = None):
        super().__init__()
        d_ff = 4 * d_model if d_ff is None else d_ff
        self.causal, self.norm_first, self.attn_scale = causal, norm_first, attn_scale
        self.norm1 = make_norm(norm, d_model, norm_eps)
        self.attn = MultiHeadAttention(d_model, n_heads, bias=bias)
        if cross_attention:
            self.norm_cross = make_norm(norm, d_model, norm_eps)
            self.cross_attn = MultiHeadAttention(d_model, n_heads, bias=bias)
        self.norm2 = make_norm(norm, d_model, norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_ff, bias=bias),
            make_activation(activation),
            nn.Linear(d_ff, d_model, bias=bias),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                position_bias: torch.Tensor | None = None, cache: KVCache | None = None,
                layer: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, d) -> (B, L, d).

        ``mask``: boolean, broadcast to (B, H, L, S), True = attend (e.g. a padding mask
        (B, 1, 1, S)); a causal block combines it with the causal mask. ``context``
        (B, S_ctx, d) and ``context_mask`` (broadcast to (B, H, L, S_ctx)) feed the
        cross-attention. ``position_bias`` (1 or B, H, L, S) is added to the self-attention
        scores (T5). ``cache`` holds the keys and values of earlier positions (generation),
        this block's in its layer ``layer``: x is then the next positions only, and S counts
        the cached ones too; ``positions`` (B, L) are their positions in their own sequences,
        -1 for padding (see :func:`attention`).
        """
        if hasattr(self, "cross_attn") and context is None:
            raise ValueError("this block has cross-attention: pass context (B, S, d_model)")
        L = x.shape[1]
        held = cache.held(layer) if cache is not None else 0
        is_causal = False
        if self.causal and L > 1:  # (a single new query may see every key)
            if mask is None and position_bias is None and positions is None and held == 0:
                is_causal = True  # the fused kernel's own causal mask
            else:
                allowed = causal_mask(L, L + held, device=x.device)  # (L, S), bottom right
                mask = allowed if mask is None else mask & allowed
        x = self._residual(x, self.norm1, lambda h: self._attend(
            self.attn, h, None, add_bias(mask, position_bias), cache, layer, positions,
            is_causal))
        if hasattr(self, "cross_attn"):
            x = self._residual(x, self.norm_cross, lambda h: self._attend(
                self.cross_attn, h, context, context_mask, None, 0, None, False))
        return self._residual(x, self.norm2, self.mlp)

    def _residual(self, x: torch.Tensor, norm: nn.Module,
                  branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Pre-LN ``x + branch(norm(x))`` or post-LN ``norm(x + branch(x))``."""
        if self.norm_first:
            return x + self.dropout(branch(norm(x)))
        return norm(x + self.dropout(branch(x)))

    def _attend(self, attn: MultiHeadAttention, h: torch.Tensor, context: torch.Tensor | None,
                mask: torch.Tensor | None, cache: KVCache | None, layer: int,
                positions: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        """``attn`` on h; its own forward unless a scale, a cache or the causal kernel is used."""
        if self.attn_scale is None and cache is None and not is_causal:
            return attn(h, context=context, mask=mask)
        return attention(attn, h, context, mask=mask, scale=self.attn_scale, cache=cache,
                         layer=layer, positions=positions, is_causal=is_causal)


def init_gpt_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2 and BERT initialisation: N(0, 0.02) weights, zero biases (norms stay 1 and 0)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def input_major(weight: torch.Tensor) -> nn.Parameter:
    """``weight`` (out, in), same values, laid out in memory as (in, out): ``.t()`` is contiguous.

    A decode step multiplies one row vector by every weight matrix, a product limited by
    reading the matrix from memory, and CPU BLAS (MKL) reads an (in, out) matrix for it about
    a third faster than the (out, in) that ``nn.Linear`` allocates. Hugging Face's GPT-2 keeps
    its ``Conv1D`` weights (in, out) for that reason. Shapes, values and the ``nn.Linear``
    semantics do not change, only the strides.
    """
    return nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=weight.requires_grad)


def next_token(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0,
               top_k: int | None = None, generator: torch.Generator | None = None
               ) -> torch.Tensor:
    """Pick the next token from the last position's logits (B, V): (B, 1).

    Greedy takes the argmax. Sampling divides the logits by ``temperature``, keeps the
    ``top_k`` largest (Fan et al., 2018, "Hierarchical Neural Story Generation") and draws
    from the softmax with ``generator`` (on the logits' device), so a seeded run repeats.
    """
    if not do_sample:
        return logits.argmax(dim=-1, keepdim=True)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def train_next_token(model: nn.Module, sample: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                     steps: int, lr: float) -> list[float]:
    """AdamW (Loshchilov & Hutter, 2019) on the next-token cross-entropy; the loss per step.

    ``sample()`` draws a fresh batch ``(inputs (B, L), targets (B, L))``, targets being the
    next tokens with :data:`~helpers.tasks.IGNORE_INDEX` where nothing is scored. The model
    is left in eval mode.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        inputs, targets = sample()
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(),
                               ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def decode(step: Callable[[torch.Tensor, int], torch.Tensor], idx: torch.Tensor,
           max_new_tokens: int, use_cache: bool, seen: int = 0, do_sample: bool = False,
           temperature: float = 1.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """The generation loop of the decoder-only models: idx (B, L) -> (B, L + max_new_tokens).

    ``step(tokens, start)`` runs the model on ``tokens[:, start:]``, the tokens it has not
    seen, and returns the last position's logits (B, V); ``tokens`` (B, t) is everything so
    far. With ``use_cache`` the model keeps its own K/V cache, which holds the first
    ``seen`` tokens already: each step feeds the prompt's rest, then one token at a time.
    Without, every step feeds the whole sequence. The output is allocated once and the next
    token is chosen by :func:`next_token`.
    """
    B, prompt = idx.shape
    out = idx.new_empty(B, prompt + max_new_tokens)
    out[:, :prompt] = idx
    start = seen if use_cache else 0
    for t in range(prompt, prompt + max_new_tokens):
        logits = step(out[:, :t], start)  # (B, V)
        out[:, t] = next_token(logits, do_sample, temperature, top_k, generator)[:, 0]
        if use_cache:
            start = t
    return out


def _check_continues(cache: KVCache, prompt: int) -> None:
    """A cache given to ``generate`` holds the first tokens of idx at most, not all of them."""
    if cache.seq_len >= prompt:
        raise ValueError(f"the cache already holds {cache.seq_len} tokens but idx has only "
                         f"{prompt}: idx must continue what the cache holds")


def copy_weights(module: nn.Module, weights: Mapping[str, torch.Tensor],
                 may_skip: tuple[str, ...] = ()) -> None:
    """Copy ``weights`` (our parameter name -> tensor) into ``module``, checking every shape.

    Every parameter of ``module`` must be given, except names starting with one of
    ``may_skip``; this catches a forgotten layer as surely as a wrong shape.
    """
    ours = module.state_dict()
    unknown = sorted(set(weights) - set(ours))
    missing = sorted(n for n in set(ours) - set(weights) if not n.startswith(may_skip))
    if unknown or missing:
        raise ValueError(f"weights do not fit the module: unknown {unknown}, missing {missing}")
    with torch.no_grad():
        for name, w in weights.items():
            if ours[name].shape != w.shape:
                raise ValueError(f"{name}: expected shape {tuple(ours[name].shape)}, "
                                 f"got {tuple(w.shape)}")
            ours[name].copy_(w)


def _hf_reference(hf_model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of a Hugging Face model, to build ours alike."""
    p = next(hf_model.parameters())
    return p.device, p.dtype


class GPT(nn.Module):
    """A GPT-2 style decoder-only language model (Radford et al., 2019).

    Token and learned position embeddings, ``n_layers`` causal pre-LN blocks, a final
    LayerNorm, and an LM head tied to the token embedding (Press & Wolf, 2017, "Using the
    Output Embedding to Improve Language Models"). ``activation`` is the feed-forward
    non-linearity: ``"gelu"`` by default as in :class:`TransformerBlock`, ``"gelu_new"`` (the
    tanh approximation) for GPT-2's weights, which :meth:`from_hf` sets.
    """

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int,
                 max_len: int, d_ff: int | None = None, dropout: float = 0.0,
                 *, activation: str = "gelu", norm_eps: float = 1e-5):
        super().__init__()
        self.max_len = max_len
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(max_len, d_model)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, d_ff, causal=True, dropout=dropout,
                             activation=activation, norm_eps=norm_eps)
            for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        init_gpt_weights(self)
        for m in self.blocks.modules():  # faster decoding on CPU, see input_major
            if isinstance(m, nn.Linear):
                m.weight = input_major(m.weight)
        self.token_embedding.weight = input_major(self.token_embedding.weight)
        self.lm_head.weight = self.token_embedding.weight  # tied

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, position_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        """idx (B, L) token ids -> logits (B, L, vocab_size); see :meth:`hidden_states`."""
        return self.lm_head(self.hidden_states(idx, attention_mask, cache, position_ids))

    def hidden_states(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      cache: KVCache | None = None, position_ids: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """idx (B, L) token ids -> the last block's output after the final norm, (B, L, d).

        ``attention_mask`` (B, S) is True for real tokens, False for padding (keys only: a
        padded position's own output is meaningless). With a ``cache`` (any cache of
        :mod:`helpers.kv_cache`, one layer per block) idx continues the cached sequence, and
        ``attention_mask`` covers the new tokens, (B, L), or all of them, (B, seq_len + L).
        ``position_ids`` (B, L) choose each token's learned position, by default the next
        ones (``seq_len, seq_len + 1, ...``); a left-padded batch gives each sequence its own.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx should have shape (B, L), got {tuple(idx.shape)}")
        B, L = idx.shape
        start = cache.seq_len if cache is not None else 0
        if start + L > self.max_len:
            raise ValueError(f"sequence of {start + L} tokens exceeds max_len={self.max_len}")
        if position_ids is None:
            position_ids = torch.arange(start, start + L, device=idx.device)  # (L,)
        x = self.dropout(self.token_embedding(idx) + self.position_embedding(position_ids))
        mask = positions = None
        if attention_mask is not None:
            real = attention_mask.bool()
            if real.shape not in ((B, L), (B, start + L)):
                raise ValueError(f"attention_mask should have shape (B, L) = {(B, L)} or "
                                 f"(B, cached + L) = {(B, start + L)}, got {tuple(real.shape)}")
            if cache is None:
                mask = real[:, None, None, :]  # (B, 1, 1, S)
            else:  # the cache records positions, -1 for padding, and masks it from then on
                positions = torch.where(real[:, -L:], position_ids.expand(B, L), -1)  # (B, L)
        for i, block in enumerate(self.blocks):
            x = block(x, mask=mask, cache=cache, layer=i, positions=positions)  # (B, L, d)
        return self.norm(x)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, use_cache: bool = True,
                 cache: KVCache | None = None, attention_mask: torch.Tensor | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue idx (B, L) by ``max_new_tokens`` tokens: (B, L + max_new_tokens).

        Greedy by default; ``do_sample`` draws with ``temperature`` and ``top_k`` (see
        :func:`next_token`). ``use_cache`` keeps each layer's keys and values in ``cache``
        (any cache of :mod:`helpers.kv_cache`; a fresh :class:`~helpers.kv_cache.KVCache`
        sized for the whole output by default), so that every step feeds only the newest
        token; a cache that already holds the first tokens of idx continues after them.
        Without it every step reruns the whole sequence; both give the same tokens.

        Prompts of different lengths go in one batch left-padded, with ``attention_mask``
        (B, L) False on the padding: each sequence gets its own positions and never attends
        to padding, so every row equals its prompt generated alone. Call ``.eval()`` first
        when the model has dropout.
        """
        B, prompt = idx.shape
        total = prompt + max_new_tokens
        if total > self.max_len:
            raise ValueError(f"{prompt} + {max_new_tokens} tokens exceed "
                             f"max_len={self.max_len} learned positions")
        real = position_ids = None
        if attention_mask is not None:
            if attention_mask.shape != idx.shape:
                raise ValueError(f"attention_mask should have the shape of idx "
                                 f"{tuple(idx.shape)}, got {tuple(attention_mask.shape)}")
            if not bool(attention_mask.all()):
                real = torch.ones(B, total, dtype=torch.bool, device=idx.device)
                real[:, :prompt] = attention_mask.bool()
                position_ids = (real.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, total)
        if use_cache:
            cache = KVCache(len(self.blocks), capacity=total) if cache is None else cache
            _check_continues(cache, prompt)

        def step(tokens: torch.Tensor, start: int) -> torch.Tensor:
            fresh = slice(start, tokens.shape[1])  # the tokens the model has not seen
            hidden = self.hidden_states(
                tokens[:, fresh], None if real is None else real[:, fresh],
                cache if use_cache else None,
                None if position_ids is None else position_ids[:, fresh])  # (B, L', d)
            return self.lm_head(hidden[:, -1])  # (B, V): only the last position is needed

        return decode(step, idx, max_new_tokens, use_cache, cache.seq_len if use_cache else 0,
                      do_sample, temperature, top_k, generator)

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> GPT:
        """A GPT with the weights of a ``transformers.GPT2LMHeadModel``.

        GPT-2 stores its linear layers as ``Conv1D`` with weights (in, out), the transpose of
        ``nn.Linear``'s, and its q, k, v projections stacked in one ``c_attn`` (d, 3d).
        """
        c = hf_model.config
        if not getattr(c, "scale_attn_weights", True) or c.scale_attn_by_inverse_layer_idx:
            raise ValueError("from_hf supports GPT-2 attention scaled by 1/sqrt(head_dim) only")
        if not getattr(c, "tie_word_embeddings", True):
            raise ValueError("from_hf needs the LM head tied to the token embedding, as GPT-2")
        device, dtype = _hf_reference(hf_model)
        ours = cls(c.vocab_size, c.n_embd, c.n_layer, c.n_head, c.n_positions, d_ff=c.n_inner,
                   activation=c.activation_function, norm_eps=c.layer_norm_epsilon)
        ours = ours.to(device=device, dtype=dtype).eval()
        hf = hf_model.state_dict()
        w = {"token_embedding.weight": hf["transformer.wte.weight"],
             "lm_head.weight": hf["transformer.wte.weight"],
             "position_embedding.weight": hf["transformer.wpe.weight"],
             "norm.weight": hf["transformer.ln_f.weight"],
             "norm.bias": hf["transformer.ln_f.bias"]}
        for i in range(c.n_layer):
            src, dst = f"transformer.h.{i}.", f"blocks.{i}."
            qkv_w = hf[src + "attn.c_attn.weight"].t().chunk(3, dim=0)  # 3 x (d, d), (out, in)
            qkv_b = hf[src + "attn.c_attn.bias"].chunk(3, dim=0)  # 3 x (d,)
            for name, weight, bias in zip(("q_proj", "k_proj", "v_proj"), qkv_w, qkv_b):
                w[f"{dst}attn.{name}.weight"], w[f"{dst}attn.{name}.bias"] = weight, bias
            for ours_name, hf_name in (("attn.out_proj", "attn.c_proj"), ("mlp.0", "mlp.c_fc"),
                                       ("mlp.2", "mlp.c_proj")):
                w[f"{dst}{ours_name}.weight"] = hf[f"{src}{hf_name}.weight"].t()  # Conv1D
                w[f"{dst}{ours_name}.bias"] = hf[f"{src}{hf_name}.bias"]
            for ours_name, hf_name in (("norm1", "ln_1"), ("norm2", "ln_2")):
                w[f"{dst}{ours_name}.weight"] = hf[f"{src}{hf_name}.weight"]
                w[f"{dst}{ours_name}.bias"] = hf[f"{src}{hf_name}.bias"]
        copy_weights(ours, w)
        return ours


class BertEncoder(nn.Module):
    """A BERT encoder (Devlin et al., 2019) with its masked-language-model head.

    Embeddings are token + learned position + token type (segment A or B), then LayerNorm;
    then ``n_layers`` bidirectional post-LN blocks. :meth:`forward` returns the hidden states;
    :meth:`mlm_logits` turns them into vocabulary logits with BERT's MLM head (dense, GELU,
    LayerNorm, then the token embedding transposed plus a bias).
    """

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int,
                 max_len: int, d_ff: int | None = None, type_vocab_size: int = 2,
                 dropout: float = 0.0, *, activation: str = "gelu", norm_eps: float = 1e-12):
        super().__init__()
        self.max_len = max_len
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(max_len, d_model)
        self.token_type_embedding = nn.Embedding(type_vocab_size, d_model)
        self.embedding_norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, d_ff, dropout=dropout, norm_first=False,
                             activation=activation, norm_eps=norm_eps)
            for _ in range(n_layers))
        self.mlm_dense = nn.Linear(d_model, d_model)
        self.mlm_activation = make_activation(activation)
        self.mlm_norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(vocab_size))
        init_gpt_weights(self)

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, L) -> hidden states (B, L, d_model).

        ``attention_mask`` (B, L) is True for real tokens, False for padding, which no
        position attends to. ``token_type_ids`` (B, L) are 0 for segment A (the default), 1
        for segment B.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx should have shape (B, L), got {tuple(idx.shape)}")
        if idx.shape[1] > self.max_len:
            raise ValueError(f"sequence of {idx.shape[1]} tokens exceeds max_len={self.max_len}")
        positions = torch.arange(idx.shape[1], device=idx.device)  # (L,)
        types = torch.zeros_like(idx) if token_type_ids is None else token_type_ids
        x = (self.token_embedding(idx) + self.position_embedding(positions)
             + self.token_type_embedding(types))  # (B, L, d)
        x = self.dropout(self.embedding_norm(x))
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask=mask)  # (B, L, d)
        return x

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, d) -> masked-token logits (B, L, vocab_size)."""
        h = self.mlm_norm(self.mlm_activation(self.mlm_dense(hidden)))
        return F.linear(h, self.token_embedding.weight, self.mlm_bias)  # tied decoder

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> BertEncoder:
        """A BertEncoder with the weights of a ``transformers.BertModel`` or ``BertForMaskedLM``.

        A ``BertModel`` has no MLM head, so the head keeps its fresh initialisation.
        """
        c = hf_model.config
        if getattr(c, "position_embedding_type", "absolute") != "absolute":
            raise ValueError("from_hf supports BERT with absolute position embeddings only")
        device, dtype = _hf_reference(hf_model)
        ours = cls(c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                   c.max_position_embeddings, d_ff=c.intermediate_size,
                   type_vocab_size=c.type_vocab_size, activation=c.hidden_act,
                   norm_eps=c.layer_norm_eps)
        ours = ours.to(device=device, dtype=dtype).eval()
        hf = hf_model.state_dict()
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in hf else ""
        pairs = {"token_embedding": "embeddings.word_embeddings",
                 "position_embedding": "embeddings.position_embeddings",
                 "token_type_embedding": "embeddings.token_type_embeddings",
                 "embedding_norm": "embeddings.LayerNorm"}
        for i in range(c.num_hidden_layers):
            src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
            pairs.update({dst + "attn.q_proj": src + "attention.self.query",
                          dst + "attn.k_proj": src + "attention.self.key",
                          dst + "attn.v_proj": src + "attention.self.value",
                          dst + "attn.out_proj": src + "attention.output.dense",
                          dst + "norm1": src + "attention.output.LayerNorm",
                          dst + "mlp.0": src + "intermediate.dense",
                          dst + "mlp.2": src + "output.dense",
                          dst + "norm2": src + "output.LayerNorm"})
        w = {f"{ours_name}.{kind}": hf[f"{prefix}{hf_name}.{kind}"]
             for ours_name, hf_name in pairs.items() for kind in ("weight", "bias")
             if f"{prefix}{hf_name}.{kind}" in hf}
        if prefix:  # BertForMaskedLM: its MLM head too
            head = "cls.predictions."
            w.update({"mlm_dense.weight": hf[head + "transform.dense.weight"],
                      "mlm_dense.bias": hf[head + "transform.dense.bias"],
                      "mlm_norm.weight": hf[head + "transform.LayerNorm.weight"],
                      "mlm_norm.bias": hf[head + "transform.LayerNorm.bias"],
                      "mlm_bias": hf.get(head + "bias", hf.get(head + "decoder.bias"))})
        copy_weights(ours, w, may_skip=() if prefix else ("mlm_",))
        return ours


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """T5's bucket (an integer in ``[0, num_buckets)``) for each ``key - query`` distance.

    Half the buckets hold exact small distances; the other half grow logarithmically up to
    ``max_distance``, beyond which all distances share the last bucket (Raffel et al., 2020,
    after Shaw et al., 2018). Bidirectional (encoder) buckets split into keys before and
    after the query; unidirectional (decoder) ones see only keys before it.
    """
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return bucket + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """T5's learned scalar per head and distance bucket, added to the attention scores.

    One table serves every layer of a stack (Hugging Face keeps it in the first layer).
    """

    def __init__(self, n_heads: int, num_buckets: int = 32, max_distance: int = 128,
                 bidirectional: bool = True):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.bidirectional = bidirectional
        self.relative_attention_bias = nn.Embedding(num_buckets, n_heads)

    def forward(self, L: int, S: int, device: torch.device | None = None) -> torch.Tensor:
        """The bias (1, H, L, S) for L queries that are the last L of S positions."""
        query = torch.arange(S - L, S, device=device)[:, None]  # (L, 1)
        key = torch.arange(S, device=device)[None, :]  # (1, S)
        buckets = relative_position_bucket(key - query, self.bidirectional, self.num_buckets,
                                           self.max_distance)  # (L, S)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (1, H, L, S)


class T5Stack(nn.Module):
    """T5's encoder (bidirectional) or decoder (causal, with cross-attention) stack."""

    def __init__(self, d_model: int, n_layers: int, n_heads: int, d_ff: int, decoder: bool,
                 num_buckets: int, max_distance: int, dropout: float, norm_eps: float):
        super().__init__()
        self.position_bias = RelativePositionBias(n_heads, num_buckets, max_distance,
                                                  bidirectional=not decoder)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, d_ff, causal=decoder, cross_attention=decoder,
                             dropout=dropout, activation="relu", bias=False, norm="rms",
                             norm_eps=norm_eps, attn_scale=1.0)
            for _ in range(n_layers))
        self.norm = RMSNorm(d_model, eps=norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Embedded x (B, L, d) -> (B, L, d); masks as in :meth:`TransformerBlock.forward`."""
        L = x.shape[1]
        bias = self.position_bias(L, L, device=x.device).to(x.dtype)  # (1, H, L, L)
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, mask=mask, context=context, context_mask=context_mask,
                      position_bias=bias)
        return self.dropout(self.norm(x))


class T5(nn.Module):
    """T5, the text-to-text encoder-decoder (Raffel et al., 2020).

    Differences from the original transformer, each for a reason the paper gives: RMS norm
    without bias, no biases at all, a relative position bias shared by the layers of each
    stack instead of absolute positions, no ``1/sqrt(d_kv)`` in attention (the
    initialisation absorbs it), a ReLU feed-forward. With ``tie_word_embeddings`` the LM head
    is the shared embedding and the decoder output is scaled by ``d_model ** -0.5`` first.
    ``d_kv`` must be ``d_model // n_heads`` here (MultiHeadAttention's head size).
    """

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, d_ff: int,
                 d_kv: int | None = None, relative_attention_num_buckets: int = 32,
                 relative_attention_max_distance: int = 128, *,
                 n_decoder_layers: int | None = None, dropout: float = 0.0,
                 norm_eps: float = 1e-6, tie_word_embeddings: bool = True):
        super().__init__()
        if d_kv is not None and d_kv * n_heads != d_model:
            raise ValueError(f"d_kv={d_kv} must equal d_model // n_heads = {d_model // n_heads}: "
                             "MultiHeadAttention splits d_model into n_heads heads")
        self.d_model, self.tie_word_embeddings = d_model, tie_word_embeddings
        self.shared = nn.Embedding(vocab_size, d_model)
        stack = dict(d_model=d_model, n_heads=n_heads, d_ff=d_ff, dropout=dropout,
                     num_buckets=relative_attention_num_buckets,
                     max_distance=relative_attention_max_distance, norm_eps=norm_eps)
        self.encoder = T5Stack(n_layers=n_layers, decoder=False, **stack)
        self.decoder = T5Stack(n_layers=n_decoder_layers or n_layers, decoder=True, **stack)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights(n_heads)
        if tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    def _init_weights(self, n_heads: int) -> None:
        """Mesh TensorFlow's T5 initialisation: each weight N(0, 1/fan_in), queries 1/(d·d_kv).

        The query's extra ``1/d_kv`` is where T5 puts the ``1/sqrt(d_kv)`` of attention.
        """
        d_kv = self.d_model // n_heads
        nn.init.normal_(self.shared.weight, std=1.0)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=m.in_features ** -0.5)
            elif isinstance(m, RelativePositionBias):
                nn.init.normal_(m.relative_attention_bias.weight, std=self.d_model ** -0.5)
        for m in self.modules():
            if isinstance(m, MultiHeadAttention):
                nn.init.normal_(m.q_proj.weight, std=(self.d_model * d_kv) ** -0.5)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
               ) -> torch.Tensor:
        """input_ids (B, S) -> encoder states (B, S, d); attention_mask (B, S), True = token."""
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        return self.encoder(self.shared(input_ids), mask=mask)

    def decode(self, decoder_input_ids: torch.Tensor, encoder_states: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """decoder_input_ids (B, L) and encoder states (B, S, d) -> logits (B, L, vocab)."""
        context_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        h = self.decoder(self.shared(decoder_input_ids), context=encoder_states,
                         context_mask=context_mask)  # (B, L, d)
        if self.tie_word_embeddings:
            h = h * self.d_model ** -0.5
        return self.lm_head(h)  # (B, L, V)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, S), decoder_input_ids (B, L) -> logits (B, L, vocab_size).

        ``attention_mask`` (B, S) is True for real input tokens, False for padding.
        """
        for name, ids in (("input_ids", input_ids), ("decoder_input_ids", decoder_input_ids)):
            if ids.dim() != 2:
                raise ValueError(f"{name} should have shape (B, L), got {tuple(ids.shape)}")
        return self.decode(decoder_input_ids, self.encode(input_ids, attention_mask),
                           attention_mask)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 attention_mask: torch.Tensor | None = None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, decoder_start_token_id: int = 0
                 ) -> torch.Tensor:
        """Decode (B, 1 + max_new_tokens) tokens, starting from ``decoder_start_token_id``.

        The encoder runs once; the decoder reruns on the whole output each step (no K/V
        cache: lesson 09 adds one to GPT). Greedy by default, sampling as :func:`next_token`.
        No stop at an end-of-sequence token: every row gets ``max_new_tokens`` tokens.
        """
        states = self.encode(input_ids, attention_mask)  # (B, S, d)
        out = torch.full((input_ids.shape[0], 1), decoder_start_token_id,
                         dtype=torch.long, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = self.decode(out, states, attention_mask)[:, -1]  # (B, V)
            out = torch.cat([out, next_token(logits, do_sample, temperature, top_k,
                                             generator)], dim=1)
        return out

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> T5:
        """A T5 with the weights of a ``transformers.T5ForConditionalGeneration``.

        Supports the original T5 (``feed_forward_proj="relu"``), not T5 v1.1's gated GELU.
        """
        c = hf_model.config
        if getattr(c, "is_gated_act", False) or c.feed_forward_proj != "relu":
            raise ValueError(f"from_hf supports feed_forward_proj='relu' (the original T5), "
                             f"got {c.feed_forward_proj!r}")
        # transformers >= 5 always ties the weights and says whether to scale separately
        scale = getattr(c, "scale_decoder_outputs", c.tie_word_embeddings)
        device, dtype = _hf_reference(hf_model)
        ours = cls(c.vocab_size, c.d_model, c.num_layers, c.num_heads, c.d_ff, d_kv=c.d_kv,
                   relative_attention_num_buckets=c.relative_attention_num_buckets,
                   relative_attention_max_distance=c.relative_attention_max_distance,
                   n_decoder_layers=c.num_decoder_layers, norm_eps=c.layer_norm_epsilon,
                   tie_word_embeddings=scale)
        ours = ours.to(device=device, dtype=dtype).eval()
        hf = hf_model.state_dict()
        w = {"shared.weight": hf["shared.weight"], "lm_head.weight": hf["lm_head.weight"]}
        for stack, n_layers in (("encoder", c.num_layers), ("decoder", c.num_decoder_layers)):
            w[f"{stack}.norm.weight"] = hf[f"{stack}.final_layer_norm.weight"]
            w[f"{stack}.position_bias.relative_attention_bias.weight"] = hf[
                f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
            for i in range(n_layers):
                src, dst = f"{stack}.block.{i}.layer.", f"{stack}.blocks.{i}."
                sublayers = [("attn", "norm1", "0", "SelfAttention")]
                if stack == "decoder":
                    sublayers.append(("cross_attn", "norm_cross", "1", "EncDecAttention"))
                for attn, norm, j, hf_attn in sublayers:
                    for ours_proj, hf_proj in zip(("q_proj", "k_proj", "v_proj", "out_proj"),
                                                  "qkvo"):
                        w[f"{dst}{attn}.{ours_proj}.weight"] = hf[
                            f"{src}{j}.{hf_attn}.{hf_proj}.weight"]
                    w[f"{dst}{norm}.weight"] = hf[f"{src}{j}.layer_norm.weight"]
                ff = len(sublayers)  # index of the feed-forward sublayer
                w[f"{dst}mlp.0.weight"] = hf[f"{src}{ff}.DenseReluDense.wi.weight"]
                w[f"{dst}mlp.2.weight"] = hf[f"{src}{ff}.DenseReluDense.wo.weight"]
                w[f"{dst}norm2.weight"] = hf[f"{src}{ff}.layer_norm.weight"]
        copy_weights(ours, w)
        return ours


# --- the Llama family (lesson 07) ---------------------------------------------------------

_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


class SwiGLU(nn.Module):
    """The gated feed-forward of Llama and Mistral: ``down(silu(gate(x)) * up(x))``.

    Shazeer (2020), "GLU Variants Improve Transformer": a gate, passed through the SiLU
    (Swish), multiplies a second projection. Three matrices instead of two, so Llama takes
    ``d_ff`` about 8/3 · d_model (not 4 ·) to keep the parameter count.
    """

    def __init__(self, d_model: int, d_ff: int, bias: bool = False, activation: str = "silu"):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=bias)
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.activation = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, d_model) -> (B, L, d_model)."""
        return self.down(self.activation(self.gate(x)) * self.up(x))


def causal_gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         window: int | None = None) -> torch.Tensor:
    """Causal (optionally sliding-window) grouped-query attention, on PyTorch's fused SDPA.

    q (B, H, L, D) are the last L of S positions; k, v (B, H_kv, S, D) with H_kv dividing H
    (query head h reads K/V head h // (H / H_kv)). With a ``window`` W the query at position
    p sees keys p - W < j <= p (bottom right over the S keys): keys no query can see are
    sliced off, so a decode step (L = 1) attends to its last W keys with no mask at all.
    Returns (B, H, L, D). Every query sees itself, so no row is ever fully masked.
    """
    L, S = q.shape[-2], k.shape[-2]
    if window is not None and S - L - window + 1 > 0:
        first = S - L - window + 1  # keys before this one are out of every query's window
        k, v, S = k[:, :, first:], v[:, :, first:], S - first
    mask, is_causal = None, False
    if window is not None and S > window:
        mask = sliding_window_mask(L, window, device=q.device, S=S)  # (L, S)
    elif L == S and L > 1:
        is_causal = True  # top left = bottom right when L = S: PyTorch's fastest path
    elif L > 1:
        mask = causal_mask(L, S, device=q.device)  # (L, S)
    group = q.shape[1] // k.shape[1]
    if group > 1 and not _SDPA_HAS_GQA:
        k, v = repeat_kv(k, group), repeat_kv(v, group)  # (B, H, S, D)
    gqa = {"enable_gqa": True} if group > 1 and _SDPA_HAS_GQA else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, **gqa)


def rope_attention(attn: MultiHeadAttention, x: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, window: int | None = None, cache: KVCache | None = None,
                   layer: int = 0) -> torch.Tensor:
    """Causal self-attention through ``attn``'s projections with rotary positions: (B, L, d).

    x (B, L, d_model) holds the next L positions; cos, sin (L, head_dim) their angles
    (:func:`helpers.rope.rope_cos_sin`). Queries and keys are rotated, then the keys and
    values join ``cache`` (layer ``layer``), which returns what the queries attend to: the
    keys are cached already rotated, so they are never rotated again. A cache that evicts by
    attention weights (H2O) gets them from the reference attention, over what it returned.
    """
    q = apply_rope(split_heads(attn.q_proj(x), attn.n_heads), cos, sin)  # (B, H, L, D)
    k = apply_rope(split_heads(attn.k_proj(x), attn.n_kv_heads), cos, sin)  # (B, H_kv, L, D)
    v = split_heads(attn.v_proj(x), attn.n_kv_heads)  # (B, H_kv, L, D)
    if cache is not None:
        k, v = cache.update(layer, k, v)  # (B, H_kv, S, D)
    if cache is None or not getattr(cache, "needs_attention_weights", False):
        return attn.out_proj(merge_heads(causal_gqa_attention(q, k, v, window)))
    L, S = q.shape[-2], k.shape[-2]  # a cache that evicts by attention (H2O): the reference
    allowed = (causal_mask(L, S, device=q.device) if window is None
               else sliding_window_mask(L, window, device=q.device, S=S))  # (L, S)
    group = attn.n_heads // attn.n_kv_heads
    out, weights = scaled_dot_product_attention(q, repeat_kv(k, group), repeat_kv(v, group),
                                                mask=allowed)  # (B, H, L, D), (B, H, L, S)
    cache.record_attention(layer, weights)
    return attn.out_proj(merge_heads(out))


class LlamaBlock(nn.Module):
    """One Llama (or Mistral) layer: pre-RMSNorm, RoPE attention with grouped K/V heads,
    pre-RMSNorm, SwiGLU; each sublayer added to the residual stream::

        x = x + attn(norm1(x))
        x = x + mlp(norm2(x))
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, d_ff: int,
                 head_dim: int | None = None, *, window: int | None = None,
                 attn_bias: bool = False, mlp_bias: bool = False, norm_eps: float = 1e-6,
                 activation: str = "silu"):
        super().__init__()
        self.window = window
        self.norm1 = RMSNorm(d_model, eps=norm_eps)
        self.attn = MultiHeadAttention(d_model, n_heads, n_kv_heads, bias=attn_bias,
                                       head_dim=head_dim)
        self.norm2 = RMSNorm(d_model, eps=norm_eps)
        self.mlp = SwiGLU(d_model, d_ff, bias=mlp_bias, activation=activation)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x (B, L, d) at the positions whose angles are cos, sin (L, head_dim) -> (B, L, d)."""
        x = x + rope_attention(self.attn, self.norm1(x), cos, sin, self.window, cache, layer)
        return x + self.mlp(self.norm2(x))


class Llama(nn.Module):
    """A Llama-family decoder: Llama 2 and 3 (Touvron et al., 2023) and Mistral (Jiang et al.,
    2023).

    Token embedding (no position embedding: RoPE rotates queries and keys instead, with
    ``rope_base``), ``n_layers`` :class:`LlamaBlock`, a final RMSNorm and an LM head, tied
    to the embedding when ``tie_embeddings``. ``n_kv_heads`` sets grouped-query attention
    (``n_heads``: MHA, 1: MQA); ``head_dim`` defaults to ``d_model // n_heads``; ``d_ff``
    to ``8/3 · d_model``; ``window`` makes every layer attend to the last ``window`` keys
    only (Mistral). ``attn_bias`` and ``mlp_bias`` add biases to the projections.
    """

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int,
                 n_kv_heads: int | None = None, d_ff: int | None = None, *,
                 head_dim: int | None = None, window: int | None = None,
                 rope_base: float = 10000.0, norm_eps: float = 1e-6, attn_bias: bool = False,
                 mlp_bias: bool = False, tie_embeddings: bool = False,
                 activation: str = "silu"):
        super().__init__()
        if window is not None and window < 1:
            raise ValueError(f"window must be at least 1 (or None for full attention), "
                             f"got {window}")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        d_ff = 8 * d_model // 3 if d_ff is None else d_ff
        self.window, self.rope_base = window, rope_base
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(
            LlamaBlock(d_model, n_heads, n_kv_heads, d_ff, head_dim, window=window,
                       attn_bias=attn_bias, mlp_bias=mlp_bias, norm_eps=norm_eps,
                       activation=activation)
            for _ in range(n_layers))
        self.head_dim = self.blocks[0].attn.head_dim
        self.norm = RMSNorm(d_model, eps=norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        init_gpt_weights(self)
        if tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """idx (B, L) token ids -> logits (B, L, vocab_size), or (B, 1, V) when ``last_only``.

        With a ``cache`` (one layer per block, :mod:`helpers.kv_cache`) idx continues the
        cached sequence: its positions start at ``cache.seq_len``.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx should have shape (B, L), got {tuple(idx.shape)}")
        start = cache.seq_len if cache is not None else 0
        positions = torch.arange(start, start + idx.shape[1], device=idx.device)  # (L,)
        x = self.token_embedding(idx)  # (B, L, d)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_base, dtype=x.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache=cache, layer=i)  # (B, L, d)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))  # (B, L, V)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, use_cache: bool = True,
                 cache: KVCache | None = None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue idx (B, L) by ``max_new_tokens`` tokens: (B, L + max_new_tokens).

        As :meth:`GPT.generate`: greedy by default, sampling with ``do_sample``; ``use_cache``
        keeps keys and values in ``cache``, any cache of :mod:`helpers.kv_cache`. By default
        a model with a sliding window gets Mistral's rolling buffer,
        ``SinkCache(n_layers, window, n_sinks=0)``, which holds the last ``window`` tokens
        and no more (attention never reads further back), and a model without one a
        :class:`~helpers.kv_cache.KVCache` sized for the whole output. A cache that already
        holds the first tokens of idx continues after them.
        """
        if use_cache and cache is None:
            cache = (SinkCache(len(self.blocks), window=self.window, n_sinks=0)
                     if self.window is not None
                     else KVCache(len(self.blocks), capacity=idx.shape[1] + max_new_tokens))
        if use_cache:
            _check_continues(cache, idx.shape[1])

        def step(tokens: torch.Tensor, start: int) -> torch.Tensor:
            return self(tokens[:, start:], cache=cache if use_cache else None,
                        last_only=True)[:, -1]  # (B, V)

        return decode(step, idx, max_new_tokens, use_cache, cache.seq_len if use_cache else 0,
                      do_sample, temperature, top_k, generator)

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> Llama:
        """A Llama with the weights of a ``transformers.LlamaForCausalLM`` or
        ``MistralForCausalLM``.

        Supports the default RoPE (any ``rope_theta``), GQA, any ``head_dim``, attention and
        MLP biases, tied or untied embeddings, and Mistral's ``sliding_window``. RoPE scaling
        (linear, dynamic, YaRN, Llama 3's), partial rotary dimensions and other model types
        raise a ValueError.
        """
        c = hf_model.config
        if c.model_type not in ("llama", "mistral"):
            raise ValueError(f"from_hf supports LlamaForCausalLM and MistralForCausalLM, got "
                             f"model_type {c.model_type!r}")
        rope_base = _hf_rope_base(c)
        device, dtype = _hf_reference(hf_model)
        tied = hf_model.get_output_embeddings().weight is hf_model.get_input_embeddings().weight
        ours = cls(c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                   c.num_key_value_heads or c.num_attention_heads, c.intermediate_size,
                   head_dim=getattr(c, "head_dim", None) or None,
                   window=getattr(c, "sliding_window", None), rope_base=rope_base,
                   norm_eps=c.rms_norm_eps, attn_bias=getattr(c, "attention_bias", False),
                   mlp_bias=getattr(c, "mlp_bias", False), tie_embeddings=tied,
                   activation=c.hidden_act)
        ours = ours.to(device=device, dtype=dtype).eval()
        hf = hf_model.state_dict()
        w = {"token_embedding.weight": hf["model.embed_tokens.weight"],
             "norm.weight": hf["model.norm.weight"],
             "lm_head.weight": hf["lm_head.weight"] if "lm_head.weight" in hf
             else hf["model.embed_tokens.weight"]}
        pairs = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
                 "attn.v_proj": "self_attn.v_proj", "attn.out_proj": "self_attn.o_proj",
                 "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
                 "mlp.down": "mlp.down_proj", "norm1": "input_layernorm",
                 "norm2": "post_attention_layernorm"}
        for i in range(c.num_hidden_layers):
            for ours_name, hf_name in pairs.items():
                for kind in ("weight", "bias"):
                    key = f"model.layers.{i}.{hf_name}.{kind}"
                    if key in hf:
                        w[f"blocks.{i}.{ours_name}.{kind}"] = hf[key]
        copy_weights(ours, w)
        return ours


def _hf_rope_base(config) -> float:
    """``rope_theta`` of a Hugging Face Llama or Mistral config; a ValueError for any RoPE
    variant other than the default (transformers 5 keeps it in ``rope_parameters``, 4 in
    ``rope_theta`` and ``rope_scaling``)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ValueError(f"from_hf supports the default RoPE only, got rope_type {kind!r} "
                         "(RoPE scaling is not implemented)")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"from_hf supports RoPE on the whole head only, got "
                         f"partial_rotary_factor={params['partial_rotary_factor']}")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
