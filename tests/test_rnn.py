"""helpers.rnn and the lesson 01 tasks against PyTorch's own RNN and autograd."""

from __future__ import annotations

import matplotlib
import pytest
import torch
from torch import nn

from helpers import rnn
from helpers.plotting import accuracy_by_distance, gradient_norm_by_distance
from helpers.tasks import IGNORE_INDEX, recall_task

matplotlib.use("Agg")
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-9)}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


def torch_rnn(D: int, H: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> nn.RNN:
    torch.manual_seed(seed)
    return nn.RNN(D, H, batch_first=True).to(device, dtype)


def weights_of(module: nn.RNN) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W_x, W_h and the summed bias of a one-layer ``nn.RNN``, detached."""
    return (module.weight_ih_l0.detach(), module.weight_hh_l0.detach(),
            (module.bias_ih_l0 + module.bias_hh_l0).detach())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rnn_cell_matches_torch_rnn_cell(dtype, device):
    torch.manual_seed(1)
    cell = nn.RNNCell(5, 7).to(device, dtype)
    x = torch.randn(3, 5, dtype=dtype, device=device)  # (B, D)
    h = torch.randn(3, 7, dtype=dtype, device=device)  # (B, H)
    ours = rnn.rnn_cell(x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih + cell.bias_hh)
    assert ours.dtype == dtype and ours.device.type == device
    torch.testing.assert_close(ours, cell(x, h), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rnn_unroll_matches_torch_rnn(dtype, device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # cuDNN's RNN in full fp32
    module = torch_rnn(4, 6, dtype, device)
    x = torch.randn(3, 9, 4, dtype=dtype, device=device)
    h0 = torch.randn(3, 6, dtype=dtype, device=device)
    expected, h_n = module(x, h0[None])
    states = rnn.rnn_unroll(x, *weights_of(module), h0)
    torch.testing.assert_close(states, expected, **TOL[dtype])
    torch.testing.assert_close(states[:, -1], h_n[0], **TOL[dtype])
    torch.testing.assert_close(rnn.rnn_unroll(x, *weights_of(module)), module(x)[0], **TOL[dtype])


def test_rnn_shape_errors_name_the_expected_shape():
    W_x, W_h, b = weights_of(torch_rnn(4, 6, torch.float32))
    with pytest.raises(ValueError, match=r"\(B, L, D\)"):
        rnn.rnn_unroll(torch.randn(9, 4), W_x, W_h, b)
    with pytest.raises(ValueError, match=r"h_prev should have shape \(B, H\) = \(3, 6\)"):
        rnn.rnn_cell(torch.randn(3, 4), torch.randn(3, 5), W_x, W_h, b)
    with pytest.raises(ValueError, match=r"W_x should have shape \(H, D\) = \(6, 5\)"):
        rnn.rnn_cell(torch.randn(3, 5), torch.randn(3, 6), W_x, W_h, b)


def autograd_norms(module: nn.RNN, x: torch.Tensor) -> torch.Tensor:
    """||d h_L / d x_t||_F by autograd's full Jacobian through ``nn.RNN``: (B, L)."""
    jacobian = torch.autograd.functional.jacobian(lambda inputs: module(inputs)[0][:, -1], x)
    rows = torch.arange(x.shape[0])
    return jacobian[rows, :, rows].pow(2).sum(dim=(1, 3)).sqrt()  # (B, L)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_norms_match_autograd_jacobian(dtype):
    module = torch_rnn(3, 5, dtype, seed=2)
    x = torch.randn(4, 8, 3, dtype=dtype)
    states = module(x)[0].detach()
    W_x, W_h, _ = weights_of(module)
    torch.testing.assert_close(rnn.gradient_norms(states, W_x, W_h), autograd_norms(module, x),
                               **TOL[dtype])


@pytest.mark.parametrize("radius", [0.5, 0.9, 1.0])
def test_gradient_norms_respect_the_spectral_bound(radius):
    """||dh_L/dx_{L-k}||_F <= radius^k ||W_x||_F when every singular value of W_h is radius."""
    generator = torch.Generator().manual_seed(3)
    W_h = rnn.scaled_orthogonal(16, radius, generator, dtype=torch.float64)
    torch.testing.assert_close(torch.linalg.svdvals(W_h), torch.full((16,), radius,
                               dtype=torch.float64))
    W_x = torch.randn(16, 4, generator=generator, dtype=torch.float64)
    x = torch.randn(2, 30, 4, generator=generator, dtype=torch.float64)
    norms = rnn.gradient_norms(rnn.rnn_unroll(x, W_x, W_h, torch.zeros(16, dtype=W_x.dtype)),
                               W_x, W_h).flip(1)  # (B, L) by distance k
    bound = radius ** torch.arange(30, dtype=torch.float64) * torch.linalg.matrix_norm(W_x)
    assert bool((norms <= bound * (1 + 1e-9)).all())
    assert float(norms[:, -1].max()) < float(norms[:, 0].min())  # far inputs matter less


@pytest.mark.parametrize("device", DEVICES)
def test_context_vector_matches_packed_torch_rnn(device):
    """nn.RNN on a packed padded batch stops each sequence at its length: its h_n is the
    context vector."""
    module = torch_rnn(3, 5, torch.float64, device, seed=4)
    x = torch.randn(4, 7, 3, dtype=torch.float64, device=device)
    lengths = torch.tensor([7, 1, 4, 2])
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    _, h_n = module(packed)
    states = rnn.rnn_unroll(x, *weights_of(module))
    torch.testing.assert_close(rnn.context_vector(states, lengths.to(device)), h_n[0])
    with pytest.raises(ValueError, match=r"lengths should have shape \(B,\) = \(4,\)"):
        rnn.context_vector(states, lengths[:3])
    with pytest.raises(ValueError, match=r"lengths should lie in 1 .. L = 7"):
        rnn.context_vector(states, torch.tensor([7, 0, 4, 8], device=device))


def test_recurrent_tagger_reference_path_equals_fused_path():
    torch.manual_seed(5)
    model = rnn.RecurrentTagger(vocab_size=6, hidden_size=8, n_classes=3)
    tokens = torch.randint(6, (2, 11))
    logits = model(tokens)
    assert logits.shape == (2, 11, 3)
    torch.testing.assert_close(model(tokens, reference=True), logits)


def test_recall_task_targets_are_the_tokens_k_steps_back():
    generator = torch.Generator().manual_seed(6)
    tokens, targets = recall_task(5, 12, 7, 3, generator)
    assert tokens.shape == targets.shape == (5, 12)
    assert bool((targets[:, :3] == IGNORE_INDEX).all())
    assert torch.equal(targets[:, 3:], tokens[:, :-3])
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 7
    with pytest.raises(ValueError, match="distance"):
        recall_task(1, 5, 7, 5)


def test_train_recall_learns_a_short_distance():
    model = rnn.train_recall(1, hidden_size=16, length=12, steps=120)
    assert rnn.recall_accuracy(model, 1, length=12, batch=128) > 0.9


def test_recall_falls_with_distance():
    """Lesson 01's claim: the same small RNN, trained the same way, recalls the token 2 steps
    back (accuracy 1.0 on these seeds) and not the one 8 steps back (about 0.2, chance
    0.125). About a second of training each, on one thread: deterministic under load."""
    accuracy = {k: rnn.recall_accuracy(rnn.train_recall(k, hidden_size=16, length=16, steps=120),
                                       k, length=16, batch=256) for k in (2, 8)}
    assert accuracy[2] > 0.9 and accuracy[8] < 0.4, accuracy


class Oracle(nn.Module):
    """Predicts the token ``answer_at`` steps back with certainty (class 0 before that)."""

    def __init__(self, answer_at: int, vocab_size: int = 8):
        super().__init__()
        self.answer_at, self.vocab_size = answer_at, vocab_size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        past = nn.functional.pad(tokens, (self.answer_at, 0))[:, :tokens.shape[1]]
        return nn.functional.one_hot(past, self.vocab_size).float()


def test_recall_accuracy_scores_only_the_positions_with_an_answer():
    """A model that always knows the answer scores exactly 1 (the first k positions, which
    have none, are not counted); one that answers the wrong distance scores chance."""
    assert rnn.recall_accuracy(Oracle(3), 3, length=12, batch=64) == 1.0
    wrong = rnn.recall_accuracy(Oracle(2), 3, length=12, batch=2048)
    assert abs(wrong - 1 / 8) < 0.02, wrong


def test_plots_draw_one_line_per_series_with_log_scale_and_chance():
    norms = {"a": torch.tensor([1.0, 0.1, 0.01]), "b": torch.tensor([1.0, 2.0, 4.0])}
    ax = gradient_norm_by_distance(norms, bounds={"a": torch.tensor([2.0, 0.5, 0.1])})
    assert ax.get_yscale() == "log" and len(ax.get_lines()) == 3
    ax = accuracy_by_distance([1, 2, 4], {"rnn": [1.0, 0.6, 0.2]}, chance=0.125)
    assert len(ax.get_lines()) == 2 and ax.get_ylabel() == "recall accuracy"
