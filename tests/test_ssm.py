"""helpers.ssm against oracles nobody here wrote: the matrix exponential (ZOH), a triangular
solve (the linear recurrence), PyTorch's convolution (the LTI kernel), autograd; and against
each other: recurrent = convolutional, parallel = sequential, SSD = scan, state continuation =
one pass. Hugging Face's Mamba is in test_ssm_hf.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from helpers import ssm
from helpers.tasks import (IGNORE_INDEX, SELECTIVE_COPY_BLANK, SELECTIVE_COPY_MARKER,
                           selective_copying_task)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
f64 = torch.float64


def rand(*shape: int, seed: int, dtype: torch.dtype = f64, device: str = "cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=dtype).to(device)


def selective_inputs(batch: int, D: int, N: int, L: int, seed: int, dtype=f64, device="cpu"):
    """u, delta, A, B, C, D_skip as the Mamba paper shapes them, with Mamba's ranges."""
    u = rand(batch, D, L, seed=seed, dtype=dtype, device=device)
    delta = F.softplus(rand(batch, D, L, seed=seed + 1, dtype=dtype, device=device) - 1)
    A = -torch.exp(rand(D, N, seed=seed + 2, dtype=dtype, device=device))
    B = rand(batch, N, L, seed=seed + 3, dtype=dtype, device=device)
    C = rand(batch, N, L, seed=seed + 4, dtype=dtype, device=device)
    D_skip = rand(D, seed=seed + 5, dtype=dtype, device=device)
    return u, delta, A, B, C, D_skip


# --- discretization -------------------------------------------------------------------------

def van_loan(A: torch.Tensor, B: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ZOH of x' = diag(A) x + B u by one matrix exponential (Van Loan, 1978):
    exp(Δ [[A, B], [0, 0]]) = [[Ā, B̄], [0, 1]]."""
    N = A.shape[-1]
    block = torch.zeros(N + 1, N + 1, dtype=A.dtype)
    block[:N, :N] = torch.diag(A)
    block[:N, N] = B
    exp = torch.linalg.matrix_exp(delta * block)
    return exp[:N, :N], exp[:N, N]


@pytest.mark.parametrize("delta", [1e-3, 0.1, 1.7])
def test_zoh_equals_the_matrix_exponential(delta):
    A, B = -torch.exp(rand(6, seed=0)), rand(6, seed=1)
    A[0] = 0.0  # a pure integrator: B̄ = ΔB, the limit of (e^{ΔA} - 1)/A
    A_bar, B_bar = ssm.discretize_zoh(A, B, delta)
    A_exact, B_exact = van_loan(A, B, delta)
    torch.testing.assert_close(torch.diag(A_bar), A_exact, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(B_bar, B_exact, atol=1e-12, rtol=1e-10)


def test_zoh_broadcasts_and_the_simplified_rule_is_first_order():
    A, B = -torch.exp(rand(3, 1, 5, seed=2)), rand(5, seed=3)  # (3, 1, N), (N,)
    delta = torch.tensor([0.01, 0.02, 0.04, 0.08], dtype=f64)[:, None]  # (4, 1)
    A_bar, B_bar = ssm.discretize_zoh(A, B, delta)
    assert A_bar.shape == B_bar.shape == (3, 4, 5)
    _, simple = ssm.discretize_zoh(A, B, delta, simplified=True)
    assert simple.shape == (3, 4, 5)
    torch.testing.assert_close(simple, (delta * B).expand(3, 4, 5))
    error = (simple - B_bar).abs().amax(dim=(0, 2))  # (4,): per Δ, error O(Δ²)
    assert bool((error[1:] / error[:-1] > 3.5).all()), error  # doubling Δ quadruples it


def test_zoh_gradient_is_finite_where_A_is_zero():
    A = torch.tensor([0.0, -1.0], dtype=f64, requires_grad=True)
    A_bar, B_bar = ssm.discretize_zoh(A, torch.ones(2, dtype=f64), 0.5)
    (A_bar.sum() + B_bar.sum()).backward()
    assert torch.isfinite(A.grad).all()
    # d/dA of (e^{ΔA} - 1)/A at A = 0 is Δ²/2
    assert abs(float(A.grad[0]) - (0.5 + 0.5 ** 2 / 2)) < 1e-6


# --- LTI: recurrent = convolutional ---------------------------------------------------------

def test_kernel_equals_powers_of_the_state_matrix():
    A_bar, B_bar, C = torch.rand(3, 4, dtype=f64), rand(3, 4, seed=4), rand(3, 4, seed=5)
    K = ssm.ssm_kernel(A_bar, B_bar, C, 9)
    expected = torch.stack([torch.stack([C[d] @ torch.linalg.matrix_power(torch.diag(A_bar[d]), k)
                                         @ B_bar[d] for k in range(9)]) for d in range(3)])
    torch.testing.assert_close(K, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_recurrent_equals_convolutional(device):
    A, B, C = -torch.exp(rand(5, 7, seed=6)), rand(5, 7, seed=7), rand(5, 7, seed=8)
    A_bar, B_bar = ssm.discretize_zoh(A, B, 0.3)
    A_bar, B_bar, C = A_bar.to(device), B_bar.to(device), C.to(device)
    u = rand(2, 5, 33, seed=9, device=device)
    recurrent = ssm.ssm_recurrent(u, A_bar, B_bar, C)
    K = ssm.ssm_kernel(A_bar, B_bar, C, 33)
    convolutional = ssm.ssm_convolution(u, K)
    torch.testing.assert_close(recurrent, convolutional)
    # PyTorch's own (cross-)correlation with the flipped kernel, left-padded: causal conv
    torch_conv = F.conv1d(F.pad(u, (32, 0)), K.flip(-1)[:, None], groups=5)
    torch.testing.assert_close(convolutional, torch_conv)


def test_lti_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(D, N\)"):
        ssm.ssm_recurrent(torch.zeros(1, 3, 4), torch.zeros(2, 5), torch.zeros(2, 5),
                          torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"\(batch, D, L\)"):
        ssm.ssm_convolution(torch.zeros(3, 4), torch.zeros(3, 4))


# --- the scans ------------------------------------------------------------------------------

def solve_recurrence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h_t = a_t h_{t-1} + b_t as the bidiagonal system (I - S) h = b, S[t, t-1] = a_t, solved
    by torch.linalg.solve_triangular. a, b (L,)."""
    system = torch.eye(len(a), dtype=a.dtype) - torch.diag(a[1:], -1)
    return torch.linalg.solve_triangular(system, b[:, None], upper=False)[:, 0]


@pytest.mark.parametrize("L", [1, 2, 3, 7, 16, 33, 100])
def test_scans_solve_the_recurrence(L):
    a, b = torch.rand(L, dtype=f64) * 1.5, rand(L, seed=L)
    expected = solve_recurrence(a, b)
    torch.testing.assert_close(ssm.sequential_scan(a, b), expected)
    torch.testing.assert_close(ssm.parallel_scan(a, b), expected)


@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_parallel_scan_along_any_dim_with_gradients(dim):
    a = torch.rand(5, 6, 11, dtype=f64, requires_grad=True)
    b = rand(5, 6, 11, seed=10).requires_grad_()
    fast, slow = ssm.parallel_scan(a, b, dim), ssm.sequential_scan(a, b, dim)
    torch.testing.assert_close(fast, slow)
    weights = rand(5, 6, 11, seed=11)
    grads_fast = torch.autograd.grad((fast * weights).sum(), (a, b))
    grads_slow = torch.autograd.grad((slow * weights).sum(), (a, b))
    for got, expected in zip(grads_fast, grads_slow):
        torch.testing.assert_close(got, expected)


def test_parallel_scan_gradcheck():
    a = torch.rand(2, 9, 3, dtype=f64, requires_grad=True)
    b = rand(2, 9, 3, seed=12).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ssm.parallel_scan(a, b, 1), (a, b))


def scan_by_hand(u, delta, A, B, C, D_skip):
    """The selective SSM written from the paper, one channel and one state at a time."""
    batch, channels, L = u.shape
    y = torch.zeros_like(u)
    for i in range(batch):
        for d in range(channels):
            h = torch.zeros(A.shape[1], dtype=u.dtype)
            for t in range(L):
                h = torch.exp(delta[i, d, t] * A[d]) * h + delta[i, d, t] * B[i, :, t] * u[i, d, t]
                y[i, d, t] = (C[i, :, t] * h).sum() + D_skip[d] * u[i, d, t]
    return y


@pytest.mark.parametrize("method", ["sequential", "parallel"])
def test_selective_scan_equals_the_paper_written_out(method):
    inputs = selective_inputs(2, 3, 4, 9, seed=13)
    torch.testing.assert_close(ssm.selective_scan(*inputs, method=method), scan_by_hand(*inputs))


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 16, 64])
def test_parallel_selective_scan_equals_sequential_with_gradients(chunk_size):
    inputs = [t.requires_grad_() for t in selective_inputs(2, 5, 6, 37, seed=14)]
    h0 = rand(2, 5, 6, seed=15).requires_grad_()
    fast, fast_state = ssm.selective_scan(*inputs, method="parallel", chunk_size=chunk_size,
                                          initial_state=h0, return_state=True)
    slow, slow_state = ssm.selective_scan(*inputs, method="sequential", initial_state=h0,
                                          return_state=True)
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(fast_state, slow_state)
    weights, state_weights = rand(*fast.shape, seed=16), rand(2, 5, 6, seed=17)
    for got, expected in zip(
            torch.autograd.grad((fast * weights).sum() + (fast_state * state_weights).sum(),
                                inputs + [h0]),
            torch.autograd.grad((slow * weights).sum() + (slow_state * state_weights).sum(),
                                inputs + [h0])):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("method", ["sequential", "parallel"])
def test_selective_scan_continues_from_a_state(method):
    u, delta, A, B, C, D_skip = selective_inputs(2, 4, 3, 20, seed=16)
    whole = ssm.selective_scan(u, delta, A, B, C, D_skip, method=method)
    first, state = ssm.selective_scan(u[..., :13], delta[..., :13], A, B[..., :13], C[..., :13],
                                      D_skip, method=method, return_state=True)
    second = ssm.selective_scan(u[..., 13:], delta[..., 13:], A, B[..., 13:], C[..., 13:],
                                D_skip, method=method, initial_state=state)
    torch.testing.assert_close(torch.cat([first, second], dim=-1), whole)
    steps, h = [], torch.zeros(2, 4, 3, dtype=f64)
    for t in range(20):  # one decoding step at a time
        y_t, h = ssm.selective_scan_step(h, u[..., t], delta[..., t], A, B[..., t], C[..., t],
                                         D_skip)
        steps.append(y_t)
    torch.testing.assert_close(torch.stack(steps, dim=-1), whole)


def test_selective_scan_in_half_precision_scans_in_float32():
    inputs = selective_inputs(1, 4, 3, 50, seed=17, dtype=torch.float32)
    half = [t.to(torch.bfloat16) for t in inputs]
    y = ssm.selective_scan(*half)
    assert y.dtype == torch.bfloat16
    reference = ssm.selective_scan(*[t.float() for t in half])
    torch.testing.assert_close(y.float(), reference, atol=0.05, rtol=0.02)


def test_selective_scan_errors_name_the_shapes():
    u, delta, A, B, C, D_skip = selective_inputs(2, 4, 3, 5, seed=18)
    with pytest.raises(ValueError, match=r"B should have shape \(batch, N, L\)"):
        ssm.selective_scan(u, delta, A, B.transpose(1, 2), C)
    with pytest.raises(ValueError, match=r"D should have shape \(D,\)"):
        ssm.selective_scan(u, delta, A, B, C, D_skip[:2])
    with pytest.raises(ValueError, match="method"):
        ssm.selective_scan(u, delta, A, B, C, method="blelloch")


# --- state space duality ----------------------------------------------------------------------

def test_segment_sum_equals_differences_of_prefix_sums():
    x = rand(2, 6, seed=19)
    sums = ssm.segment_sum(x)
    prefix = x.cumsum(-1)
    for t in range(6):
        for s in range(6):
            expected = prefix[:, t] - prefix[:, s] if t >= s else torch.full((2,), -torch.inf,
                                                                             dtype=f64)
            torch.testing.assert_close(sums[:, t, s], expected)


@pytest.mark.parametrize("device", DEVICES)
def test_ssd_equals_the_selective_scan_with_scalar_A_per_head(device):
    batch, H, L, P, N = 2, 3, 17, 4, 5
    x = rand(batch, H, L, P, seed=20, device=device)
    dt = F.softplus(rand(batch, H, L, seed=21, device=device))
    A = -torch.exp(rand(H, seed=22, device=device))
    B = rand(batch, 1, L, N, seed=23, device=device)  # shared by the heads, as in Mamba-2
    C = rand(batch, 1, L, N, seed=24, device=device)
    y = ssm.ssd(x, dt, A, B, C)  # (batch, H, L, P)
    # the same SSM as Mamba's scan over H·P channels: A and Δ repeated over each head's P
    u = x.permute(0, 1, 3, 2).reshape(batch, H * P, L)
    delta = dt.repeat_interleave(P, dim=1)  # (batch, H·P, L)
    A_full = A.repeat_interleave(P)[:, None].expand(H * P, N)
    scan = ssm.selective_scan(u, delta, A_full, B[:, 0].transpose(1, 2), C[:, 0].transpose(1, 2))
    torch.testing.assert_close(y.permute(0, 1, 3, 2).reshape(batch, H * P, L), scan)


def test_ssd_with_per_head_B_C_and_no_decay_is_causal_linear_attention():
    q, k, v = rand(2, 3, 8, 4, seed=25), rand(2, 3, 8, 4, seed=26), rand(2, 3, 8, 5, seed=27)
    y = ssm.ssd(v, torch.ones(2, 3, 8, dtype=f64), torch.zeros(3, dtype=f64), k, q)
    expected = torch.cat([q[..., t:t + 1, :] @ k[..., :t + 1, :].transpose(-1, -2)
                          @ v[..., :t + 1, :] for t in range(8)], dim=-2)  # (q_t · k_s) v_s
    torch.testing.assert_close(y, expected)


def test_selective_ssm_matrix_times_the_input_is_the_scan():
    u, delta, A, B, C, D_skip = selective_inputs(2, 3, 4, 11, seed=33)
    W = ssm.selective_ssm_matrix(delta, A, B, C)  # (batch, D, L, L)
    assert bool((W.triu(1) == 0).all())  # causal
    y = (W @ u[..., None])[..., 0] + D_skip[:, None] * u
    torch.testing.assert_close(y, ssm.selective_scan(u, delta, A, B, C, D_skip))


# --- the Mamba model ----------------------------------------------------------------------------

def small_mamba(selective: bool = True, **options) -> ssm.Mamba:
    torch.manual_seed(0)
    model = ssm.Mamba(53, 16, n_layers=2, d_state=5, d_conv=3, selective=selective, **options)
    with torch.no_grad():  # leave the fresh, symmetric initialisation
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.double().eval()


@pytest.mark.parametrize("selective", [True, False])
def test_block_is_causal_by_gradients(selective):
    block = small_mamba(selective).blocks[0]
    x = rand(2, 9, 16, seed=28).requires_grad_()
    (grad,) = torch.autograd.grad(block(x)[:, 4].sum(), x)
    assert bool((grad[:, 5:] == 0).all()) and bool((grad[:, :5].abs().sum(-1) > 0).all())


@pytest.mark.parametrize("splits", [(9,), (4, 5), (1, 1, 7), (3, 1, 1, 1, 3)])
def test_state_continuation_equals_one_pass(splits):
    model = small_mamba()
    idx = torch.randint(0, 53, (3, 9), generator=torch.Generator().manual_seed(29))
    whole = model(idx)
    states, pieces, start = model.empty_states(3), [], 0
    for length in splits:
        pieces.append(model(idx[:, start:start + length], states))
        start += length
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole)


@pytest.mark.parametrize("scan_method", ["sequential", "parallel"])
def test_generate_equals_an_argmax_loop_over_full_forwards(scan_method):
    model = small_mamba(scan_method=scan_method)
    idx = torch.randint(0, 53, (2, 4), generator=torch.Generator().manual_seed(30))
    expected = idx
    for _ in range(10):
        expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(model.generate(idx, 10), expected)


def test_decoding_state_is_constant_and_counted_by_mamba_state_bytes():
    model = small_mamba().half()
    states = model.empty_states(3)
    expected = ssm.mamba_state_bytes(2, d_inner=32, d_state=5, d_conv=3, batch=3)
    assert sum(state.nbytes for state in states) == expected
    model.float()
    states = model.empty_states(3)
    model.generate(torch.zeros(3, 2, dtype=torch.long), 20, states=states)
    assert sum(state.nbytes for state in states) == 2 * expected  # float32, after 22 tokens


def test_selection_is_what_the_scan_of_the_mixer_sees():
    mixer = small_mamba().blocks[0].mixer
    x = rand(2, 7, 16, seed=34)
    u, delta, B, C = mixer.selection(x)
    y = ssm.selective_scan(u, delta, mixer.A, B, C, mixer.D)
    z = mixer.in_proj(x).transpose(1, 2).chunk(2, dim=1)[1]
    torch.testing.assert_close(mixer.out_proj((y * F.silu(z)).transpose(1, 2)), mixer(x))


def test_lti_mixer_parameters_do_not_depend_on_the_input():
    mixer = small_mamba(selective=False).blocks[0].mixer
    one, other = rand(2, 32, 6, seed=31), rand(2, 32, 6, seed=32)
    for a, b in zip(mixer._ssm_parameters(one), mixer._ssm_parameters(other)):
        assert torch.equal(a, b)
    selective = small_mamba().blocks[0].mixer
    assert not torch.equal(selective._ssm_parameters(one)[1], selective._ssm_parameters(other)[1])


def test_model_errors_name_the_shapes():
    model = small_mamba()
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="one MambaState per layer"):
        model(torch.zeros(1, 5, dtype=torch.long), model.empty_states(1)[:1])


class HFMambaWeights(torch.nn.Module):
    """Stands in for a ``transformers.MambaForCausalLM``: what ``from_hf`` reads of one (its
    config and its state dict, under Hugging Face's names), without the package."""

    def __init__(self, tied: bool):
        super().__init__()
        self.config = SimpleNamespace(
            vocab_size=11, hidden_size=8, num_hidden_layers=2, state_size=3, conv_kernel=3,
            expand=2, intermediate_size=16, time_step_rank=2, use_conv_bias=True, use_bias=False,
            layer_norm_epsilon=1e-3, hidden_act="silu", tie_word_embeddings=tied)
        shapes = {"backbone.embeddings.weight": (11, 8), "backbone.norm_f.weight": (8,)}
        mixer = {"A_log": (16, 3), "D": (16,), "conv1d.weight": (16, 1, 3), "conv1d.bias": (16,),
                 "in_proj.weight": (32, 8), "x_proj.weight": (8, 16), "dt_proj.weight": (16, 2),
                 "dt_proj.bias": (16,), "out_proj.weight": (8, 16)}
        for i in range(2):
            shapes[f"backbone.layers.{i}.norm.weight"] = (8,)
            shapes.update({f"backbone.layers.{i}.mixer.{name}": shape
                           for name, shape in mixer.items()})
        g = torch.Generator().manual_seed(36)
        self.weights = {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}
        self.weights["lm_head.weight"] = (self.weights["backbone.embeddings.weight"] if tied
                                          else torch.randn(11, 8, generator=g))
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # device and dtype to build on

    def state_dict(self, *args, **kwargs):
        return dict(self.weights)


@pytest.mark.parametrize("tied", [False, True])
def test_from_hf_puts_every_hugging_face_weight_in_its_place(tied):
    hf = HFMambaWeights(tied)
    model = ssm.Mamba.from_hf(hf)
    ours = dict(model.named_parameters(remove_duplicate=False))
    expected = {"embedding.weight": "backbone.embeddings.weight",
                "norm.weight": "backbone.norm_f.weight", "lm_head.weight": "lm_head.weight"}
    for i in range(2):
        expected[f"blocks.{i}.norm.weight"] = f"backbone.layers.{i}.norm.weight"
        for name in ("A_log", "D", "conv1d.weight", "conv1d.bias", "in_proj.weight",
                     "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "out_proj.weight"):
            expected[f"blocks.{i}.mixer.{name}"] = f"backbone.layers.{i}.mixer.{name}"
    assert set(ours) == set(expected)
    for mine, theirs in expected.items():
        assert torch.equal(ours[mine], hf.weights[theirs]), f"{mine} is not {theirs}"
    assert (model.lm_head.weight is model.embedding.weight) == tied
    mixer = model.blocks[0].mixer
    assert (mixer.d_state, mixer.d_conv, mixer.dt_rank, mixer.d_inner) == (3, 3, 2, 16)
    assert model.norm.eps == model.blocks[1].norm.eps == 1e-3
    assert mixer.in_proj.bias is None and mixer.conv1d.bias is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mamba_on_cuda_matches_cpu():
    model = small_mamba()
    idx = torch.randint(0, 53, (2, 12))
    expected = model(idx)
    gpu = model.to("cuda")
    torch.testing.assert_close(gpu(idx.cuda()).cpu(), expected)
    assert torch.equal(gpu.generate(idx.cuda(), 6).cpu(), model.cpu().generate(idx, 6))


# --- the selective copying task -----------------------------------------------------------------

def test_selective_copying_task_asks_for_the_data_tokens_in_order():
    tokens, targets = selective_copying_task(64, 20, 4, 9, torch.Generator().manual_seed(35))
    assert tokens.shape == targets.shape == (64, 24)
    body, markers = tokens[:, :20], tokens[:, 20:]
    assert bool((markers == SELECTIVE_COPY_MARKER).all())
    is_data = body >= 2
    assert bool((is_data.sum(1) == 4).all()) and bool((body[~is_data] == SELECTIVE_COPY_BLANK).all())
    assert bool((targets[:, :20] == IGNORE_INDEX).all())
    assert torch.equal(targets[:, 20:], body[is_data].view(64, 4))  # in the order they came
    assert int(tokens.max()) <= 8
    positions = is_data.float().argmax(dim=1)  # first data position varies between sequences
    assert len(set(positions.tolist())) > 5
    with pytest.raises(ValueError, match="n_data"):
        selective_copying_task(1, 3, 4, 9)
    with pytest.raises(ValueError, match="vocab_size"):
        selective_copying_task(1, 5, 2, 2)
