"""The vanilla RNN and its bottleneck: a cell, an unroll, gradient norms, a trainable model.

The recurrence is Elman's (1990), in the form of ``torch.nn.RNN`` with ``tanh``::

    h_t = tanh(W_x x_t + W_h h_{t-1} + b)

Shapes: inputs ``x`` are ``(B, L, D)`` (batch first), states are ``(B, L, H)``, and the
weights follow ``torch.nn.RNN``: ``W_x`` is ``weight_ih_l0`` ``(H, D)``, ``W_h`` is
``weight_hh_l0`` ``(H, H)``, ``b`` is ``bias_ih_l0 + bias_hh_l0`` ``(H,)``. Everything runs
on the device and in the dtype of its inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from helpers.device import one_cpu_thread
from helpers.tasks import IGNORE_INDEX, recall_task


def _expect_shape(tensor: torch.Tensor, shape: tuple[int, ...], name: str, meaning: str) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} should have shape {meaning} = {shape}, got {tuple(tensor.shape)}")


def rnn_cell(x_t: torch.Tensor, h_prev: torch.Tensor, W_x: torch.Tensor, W_h: torch.Tensor,
             b: torch.Tensor) -> torch.Tensor:
    """One step of the Elman RNN, ``h_t = tanh(W_x x_t + W_h h_{t-1} + b)``, for a batch.

    ``x_t``: ``(B, D)``, ``h_prev``: ``(B, H)``, ``W_x``: ``(H, D)``, ``W_h``: ``(H, H)``,
    ``b``: ``(H,)``. Returns ``h_t``: ``(B, H)``. Row vectors, so ``W x`` is ``x @ W.T``.
    """
    if x_t.dim() != 2:
        raise ValueError(f"x_t should have shape (B, D), got {tuple(x_t.shape)}")
    B, D = x_t.shape
    H = W_h.shape[0]
    _expect_shape(h_prev, (B, H), "h_prev", "(B, H)")
    _expect_shape(W_x, (H, D), "W_x", "(H, D)")
    _expect_shape(b, (H,), "b", "(H,)")
    return torch.tanh(x_t @ W_x.T + h_prev @ W_h.T + b)  # (B, H)


def rnn_unroll(x: torch.Tensor, W_x: torch.Tensor, W_h: torch.Tensor, b: torch.Tensor,
               h0: torch.Tensor | None = None) -> torch.Tensor:
    """Run :func:`rnn_cell` over a sequence and return every state ``h_1 .. h_L``.

    ``x``: ``(B, L, D)``; ``h0``: ``(B, H)``, zeros when ``None``. Returns ``(B, L, H)``;
    the last state ``[:, -1]`` is the encoder's context vector (Sutskever et al., 2014).
    """
    if x.dim() != 3:
        raise ValueError(f"x should have shape (B, L, D), got {tuple(x.shape)}")
    B, L, _ = x.shape
    H = W_h.shape[0]
    h = x.new_zeros(B, H) if h0 is None else h0  # (B, H)
    states = []
    for t in range(L):
        h = rnn_cell(x[:, t], h, W_x, W_h, b)  # (B, H)
        states.append(h)
    return torch.stack(states, dim=1)  # (B, L, H)


def gradient_norms(states: torch.Tensor, W_x: torch.Tensor, W_h: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of ``d h_L / d x_t`` for every input ``t``, by the Jacobian product.

    With ``D_k = diag(1 - h_k^2)`` (the derivative of tanh), the chain rule gives
    ``d h_L / d x_t = D_L W_h D_{L-1} W_h ... D_{t+1} W_h D_t W_x`` (Bengio, Simard &
    Frasconi, 1994; Pascanu, Mikolov & Bengio, 2013). ``states``: ``(B, L, H)`` as returned
    by :func:`rnn_unroll`. Returns ``(B, L)``: entry ``t`` is the norm for input ``x_t``.
    """
    if states.dim() != 3:
        raise ValueError(f"states should have shape (B, L, H), got {tuple(states.shape)}")
    B, L, H = states.shape
    _expect_shape(W_h, (H, H), "W_h", "(H, H)")
    _expect_shape(W_x, (H, W_x.shape[-1]), "W_x", "(H, D)")
    derivative = 1 - states**2  # (B, L, H): tanh'(a_t) = 1 - h_t^2
    to_state = torch.eye(H, dtype=states.dtype, device=states.device).expand(B, H, H)  # dh_L/dh_t
    norms = []
    for t in reversed(range(L)):
        to_preactivation = to_state * derivative[:, t, None, :]  # (B, H, H): dh_L/da_t
        norms.append(torch.linalg.matrix_norm(to_preactivation @ W_x))  # (B,)
        to_state = to_preactivation @ W_h  # (B, H, H): dh_L/dh_{t-1}
    return torch.stack(norms[::-1], dim=1)  # (B, L)


def context_vector(states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The encoder's summary of each sequence of a padded batch: its state at its last token.

    ``states``: ``(B, L, H)``; ``lengths``: ``(B,)`` integers in ``1 .. L``. Returns
    ``(B, H)``: row ``i`` is ``states[i, lengths[i] - 1]`` (the padding after it is ignored).
    """
    if states.dim() != 3:
        raise ValueError(f"states should have shape (B, L, H), got {tuple(states.shape)}")
    B, L, H = states.shape
    _expect_shape(lengths, (B,), "lengths", "(B,)")
    if bool(((lengths < 1) | (lengths > L)).any()):
        raise ValueError(f"lengths should lie in 1 .. L = {L}, got {lengths.tolist()}")
    index = (lengths.to(states.device).long() - 1).view(B, 1, 1).expand(B, 1, H)  # (B, 1, H)
    return states.gather(1, index).squeeze(1)  # (B, H)


def scaled_orthogonal(size: int, radius: float, generator: torch.Generator | None = None,
                      dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """A random ``(size, size)`` matrix whose singular values (and |eigenvalues|) all equal
    ``radius``: a recurrent weight whose gain per step is exactly ``radius``."""
    gaussian = torch.randn(size, size, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r))  # uniformly distributed orthogonal matrix
    return (radius * q).to(dtype=dtype, device=device)


class RecurrentTagger(nn.Module):
    """Embedding, an Elman RNN and a linear read-out at every step: a token classifier whose
    only memory of the past is its fixed-size state ``h_t`` of ``hidden_size`` numbers.

    ``forward(tokens)`` takes ids ``(B, L)`` and returns logits ``(B, L, n_classes)``. The
    recurrence runs in ``torch.nn.RNN`` (fast, fused); ``reference=True`` runs the same
    weights through :func:`rnn_unroll` instead, and the tests check that the two agree.
    """

    def __init__(self, vocab_size: int, hidden_size: int, n_classes: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.rnn = nn.RNN(hidden_size, hidden_size, nonlinearity="tanh", batch_first=True)
        self.readout = nn.Linear(hidden_size, n_classes)

    def forward(self, tokens: torch.Tensor, reference: bool = False) -> torch.Tensor:
        x = self.embed(tokens)  # (B, L, H)
        if reference:
            rnn = self.rnn
            states = rnn_unroll(x, rnn.weight_ih_l0, rnn.weight_hh_l0,
                                rnn.bias_ih_l0 + rnn.bias_hh_l0)  # (B, L, H)
        else:
            states, _ = self.rnn(x)  # (B, L, H)
        return self.readout(states)  # (B, L, n_classes)


def train_recall(distance: int, hidden_size: int = 32, vocab_size: int = 8, length: int = 24,
                 steps: int = 250, batch: int = 64, lr: float = 1e-2, seed: int = 0,
                 device: torch.device | str | None = None) -> RecurrentTagger:
    """Train a :class:`RecurrentTagger` on :func:`helpers.tasks.recall_task` at one
    ``distance`` (Adam, gradient norm clipped to 1 as Pascanu et al., 2013 advise)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = RecurrentTagger(vocab_size, hidden_size, vocab_size).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    with one_cpu_thread():
        for _ in range(steps):
            tokens, targets = recall_task(batch, length, vocab_size, distance, generator, device)
            logits = model(tokens)  # (B, L, V)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    return model


@torch.no_grad()
def recall_accuracy(model: RecurrentTagger, distance: int, vocab_size: int = 8,
                    length: int = 24, batch: int = 512, seed: int = 1,
                    device: torch.device | str | None = None) -> float:
    """Fraction of the scored positions of fresh :func:`helpers.tasks.recall_task` sequences
    where the model's most likely token is the one seen ``distance`` steps earlier."""
    generator = torch.Generator().manual_seed(seed)
    tokens, targets = recall_task(batch, length, vocab_size, distance, generator, device)
    with one_cpu_thread():
        predictions = model(tokens).argmax(dim=-1)  # (B, L)
    scored = targets != IGNORE_INDEX  # (B, L)
    return float((predictions == targets)[scored].float().mean())
