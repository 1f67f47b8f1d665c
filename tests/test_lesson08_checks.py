"""Lesson 08's visible checks and hidden tests: they accept the reference solution, reject the
typical wrong answers (the visible check naming the mistake) and the shortcuts, and cannot
be fooled by a patched kernel."""

from __future__ import annotations

import math

import numpy
import pytest
import torch
import torch.nn.functional as F

import helpers.linear_attention
from helpers import flash
from helpers import linear_attention as reference_linear
from helpers import ring as reference_ring
from helpers.attention import causal_mask
from helpers.checks import CheckFailed
from helpers.checks import lesson08 as checks
from helpers.hidden import lesson

from conftest import expect_hidden_failure

LESSON = "08"

EXERCISES = ["ring_attention_simulated", "ring_bytes_per_device", "ring_work",
             "striped_positions", "linear_attention_parallel", "linear_attention_recurrent",
             "linear_attention_chunked"]


@pytest.mark.parametrize("name", EXERCISES)
def test_solution_passes_visible_and_hidden(solution, hidden, name, capsys):
    getattr(checks, name)(solution[name])
    assert "all checks passed" in capsys.readouterr().out
    for _ in range(3):  # fresh seeds, shapes and dtypes each time
        getattr(hidden, name)(solution[name])


# --- wrong answers: each is a mistake a student makes; each fails both kinds of check, the
# visible one with the message that names it ---

def ring(q, k, v, world_size, causal=False, *, merge=True, scale=None, diagonal_mask=True,
         past_mask=False, future="skip"):
    """The simulated ring with one of its typical mistakes switched on."""
    P, n = world_size, q.shape[-2] // world_size
    if q.shape[-2] % P:
        raise ValueError("L is not a multiple of P")
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    qs, ks, vs = (t.split(n, dim=-2) for t in (q, k, v))
    results = [None] * P
    for step in range(P):
        for r in range(P):
            j = (r - step) % P
            mask = None
            if causal and j > r:
                if future == "skip":
                    continue
                if future == "masked":
                    mask = torch.zeros(n, n, dtype=torch.bool, device=q.device)
            if causal and ((j == r and diagonal_mask) or (j < r and past_mask)):
                mask = causal_mask(n, device=q.device)
            partial = flash.block_attention(qs[r], ks[j], vs[j], scale, mask)
            if results[r] is None or not merge:
                results[r] = partial
            else:
                results[r] = flash.merge_attention(*results[r], *partial)
    return torch.cat([out for out, _ in results], dim=-2)


WRONG_RINGS = {
    "merge": (lambda *a, **kw: ring(*a, **kw, merge=False), "merge every block"),
    "scale": (lambda *a, **kw: ring(*a, **kw, scale=1.0), "pass scale = 1/√D"),
    "diagonal": (lambda *a, **kw: ring(*a, **kw, diagonal_mask=False), "diagonal block"),
    "every block": (lambda *a, **kw: ring(*a, **kw, past_mask=True), "causal mask on the wrong"),
    "future visible": (lambda *a, **kw: ring(*a, **kw, future="compute"), "in the future leak"),
    "future masked": (lambda *a, **kw: ring(*a, **kw, future="masked"), "skip \\(do not compute"),
}


def bytes_p_passes(batch, heads, seq_len, head_dim, world_size, bytes_per_element=2):
    return 2 * world_size * batch * heads * (seq_len // world_size) * head_dim * bytes_per_element


def bytes_k_only(batch, heads, seq_len, head_dim, world_size, bytes_per_element=2):
    return (world_size - 1) * batch * heads * (seq_len // world_size) * head_dim * bytes_per_element


def bytes_whole_sequence(batch, heads, seq_len, head_dim, world_size, bytes_per_element=2):
    return 2 * (world_size - 1) * batch * heads * seq_len * head_dim * bytes_per_element


def bytes_elements(batch, heads, seq_len, head_dim, world_size, bytes_per_element=2):
    return 2 * (world_size - 1) * batch * heads * (seq_len // world_size) * head_dim


def bytes_float(batch, heads, seq_len, head_dim, world_size, bytes_per_element=2):
    block = batch * heads * seq_len / world_size * head_dim * bytes_per_element  # a float
    return 2 * (world_size - 1) * block


WRONG_BYTES = {
    "P passes": (bytes_p_passes, "P - 1 times"),
    "K only": (bytes_k_only, "count K and V"),
    "whole sequence": (bytes_whole_sequence, "P times too much"),
    "elements": (bytes_elements, "numbers, not bytes"),
    "float": (bytes_float, "should return an int"),
}


def work(positions, *, direction=-1, strict=False, causal=True, transposed=False,
         by_index=False):
    P = positions.shape[0]
    if by_index:
        positions = torch.arange(positions.numel()).view(P, -1)
    table = torch.zeros(P, P, dtype=torch.int64)
    for step in range(P):
        for r in range(P):
            j = (r + direction * step) % P
            keys, queries = positions[j][None, :], positions[r][:, None]
            visible = (keys < queries) if strict else (keys <= queries)
            table[step, r] = visible.sum() if causal else visible.numel()
    return table.T if transposed else table


WRONG_WORK = {
    "direction": (lambda p: work(p, direction=+1), "ring rank order wrong"),
    "strict": (lambda p: work(p, strict=True), "sees its own position"),
    "not causal": (lambda p: work(p, causal=False), "not after the query"),
    "transposed": (lambda p: work(p, transposed=True), "transposed"),
    "indices": (lambda p: work(p, by_index=True), "compare positions, not indices"),
}


def striped_contiguous(seq_len, world_size):
    if seq_len % world_size:
        raise ValueError("does not split")
    return torch.arange(seq_len).view(world_size, -1)


def striped_float(seq_len, world_size):
    if seq_len % world_size:
        raise ValueError("does not split")
    return torch.arange(float(seq_len)).view(-1, world_size).T


def striped_no_error(seq_len, world_size):
    return torch.arange(seq_len - seq_len % world_size).view(-1, world_size).T


WRONG_STRIPES = {
    "contiguous": (striped_contiguous, "contiguous layout"),
    "float": (striped_float, "integers"),
    "no error": (striped_no_error, "ValueError"),
}


def linear_parallel(q, k, v, causal=False, *, phi=lambda x: F.elu(x) + 1, normalise=True,
                    scale_q=False, top_left=False, normaliser_all_keys=False,
                    quadratic=False):
    if scale_q:
        q = q / math.sqrt(q.shape[-1])
    phi_q, phi_k = phi(q), phi(k)
    L, S = q.shape[-2], k.shape[-2]
    if not causal and not quadratic:
        numerator = phi_q @ (phi_k.transpose(-2, -1) @ v)
        normaliser = phi_q @ phi_k.sum(-2)[..., None]
    else:
        weights = phi_q @ phi_k.transpose(-2, -1)
        all_keys = weights.sum(-1, keepdim=True)
        if causal:
            weights = weights * (causal_mask(L, S, device=q.device) if not top_left else
                                 torch.ones(L, S, device=q.device).tril().bool())
        numerator = weights @ v
        normaliser = all_keys if normaliser_all_keys else weights.sum(-1, keepdim=True)
    return numerator / normaliser if normalise else numerator


WRONG_PARALLEL = {
    "elu": (lambda *a, **kw: linear_parallel(*a, **kw, phi=F.elu), "feature map"),
    "relu": (lambda *a, **kw: linear_parallel(*a, **kw, phi=F.relu), "feature map"),
    "identity": (lambda *a, **kw: linear_parallel(*a, **kw, phi=lambda x: x), "feature map"),
    "normaliser": (lambda *a, **kw: linear_parallel(*a, **kw, normalise=False),
                   "forgot the normaliser"),
    "scaled": (lambda *a, **kw: linear_parallel(*a, **kw, scale_q=True), "no scale"),
    "top left": (lambda *a, **kw: linear_parallel(*a, **kw, top_left=True), "aligned top left"),
    "all keys": (lambda *a, **kw: linear_parallel(*a, **kw, normaliser_all_keys=True),
                 "the normaliser sums over every key"),
    "quadratic": (lambda *a, **kw: linear_parallel(*a, **kw, quadratic=True),
                  "built an \\(L, S\\)"),
}


def linear_recurrent(q, k, v, state=None, *, read_first=False, normalise=True,
                     ignore_state=False, in_place=False, quadratic=False):
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    if state is None or ignore_state:
        S = q.new_zeros(*q.shape[:-2], q.shape[-1], v.shape[-1])
        z = q.new_zeros(*q.shape[:-2], q.shape[-1])
    else:
        S, z = state
    if quadratic:
        weights = (phi_q @ phi_k.transpose(-2, -1)).tril()
        numerator = weights @ v + phi_q @ S
        out = numerator / (weights.sum(-1) + (phi_q * z[..., None, :]).sum(-1))[..., None]
        return out, (S + phi_k.transpose(-2, -1) @ v, z + phi_k.sum(-2))
    outputs = []
    for t in range(q.shape[-2]):
        update = phi_k[..., t, :, None] * v[..., t, None, :]
        if not read_first:
            if in_place:
                S += update
                z += phi_k[..., t, :]
            else:
                S, z = S + update, z + phi_k[..., t, :]
        numerator = (phi_q[..., t, None, :] @ S)[..., 0, :]
        normaliser = (phi_q[..., t, :] * z).sum(-1, keepdim=True)
        outputs.append(numerator / normaliser if normalise else numerator)
        if read_first:
            S, z = S + update, z + phi_k[..., t, :]
    return torch.stack(outputs, dim=-2), (S, z)


WRONG_RECURRENT = {
    "read first": (lambda *a, **kw: linear_recurrent(*a, **kw, read_first=True), "off by one"),
    "normaliser": (lambda *a, **kw: linear_recurrent(*a, **kw, normalise=False),
                   "forgot the normaliser"),
    "ignores state": (lambda *a, **kw: linear_recurrent(*a, **kw, ignore_state=True),
                      "start from the given state"),
    "in place": (lambda *a, **kw: linear_recurrent(*a, **kw, in_place=True), "in place"),
    "quadratic": (lambda *a, **kw: linear_recurrent(*a, **kw, quadratic=True),
                  "built an \\(L, L\\)"),
}


def linear_chunked(q, k, v, chunk_size, *, mask_within=True, state_first=False,
                   drop_last=False, quadratic=False):
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    L = q.shape[-2]
    if quadratic:
        weights = (phi_q @ phi_k.transpose(-2, -1)).tril()
        return weights @ v / weights.sum(-1, keepdim=True)
    S = q.new_zeros(*q.shape[:-2], q.shape[-1], v.shape[-1])
    z = q.new_zeros(*q.shape[:-2], q.shape[-1])
    outputs = []
    stop = L - L % chunk_size if drop_last else L
    for start in range(0, stop, chunk_size):
        q_c, k_c, v_c = (t[..., start:start + chunk_size, :] for t in (phi_q, phi_k, v))
        within = q_c @ k_c.transpose(-2, -1)
        if mask_within:
            within = within * causal_mask(q_c.shape[-2], device=q.device)
        if state_first:
            S, z = S + k_c.transpose(-2, -1) @ v_c, z + k_c.sum(-2)
        numerator = within @ v_c + q_c @ S
        normaliser = within.sum(-1) + (q_c * z[..., None, :]).sum(-1)
        outputs.append(numerator / normaliser[..., None])
        if not state_first:
            S, z = S + k_c.transpose(-2, -1) @ v_c, z + k_c.sum(-2)
    return torch.cat(outputs, dim=-2)


WRONG_CHUNKED = {
    "no mask": (lambda *a: linear_chunked(*a, mask_within=False), "later in the same chunk"),
    "twice": (lambda *a: linear_chunked(*a, state_first=True), "counted twice"),
    "drops last": (lambda *a: linear_chunked(*a, drop_last=True), "shorter chunk"),
    "quadratic": (lambda *a: linear_chunked(*a, quadratic=True), "built an \\(L, L\\)"),
}

WRONG = {"ring_attention_simulated": WRONG_RINGS, "ring_bytes_per_device": WRONG_BYTES,
         "ring_work": WRONG_WORK, "striped_positions": WRONG_STRIPES,
         "linear_attention_parallel": WRONG_PARALLEL,
         "linear_attention_recurrent": WRONG_RECURRENT,
         "linear_attention_chunked": WRONG_CHUNKED}
CASES = [(name, mistake) for name, wrongs in WRONG.items() for mistake in wrongs]


@pytest.mark.parametrize("name, mistake", CASES)
def test_wrong_answers_fail_visible_naming_the_mistake_and_hidden(hidden, name, mistake):
    wrong, message = WRONG[name][mistake]
    with pytest.raises(CheckFailed, match=message):
        getattr(checks, name)(wrong)
    expect_hidden_failure(lambda: getattr(hidden, name)(wrong))


# --- shortcuts: right numbers, but they call what the exercise asks to write ---

def _sdpa_linear(q, k, v, causal=False):
    """Linear attention through SDPA with log-similarity scores (no L×S matrix avoided)."""
    scores = ((F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1)).log()
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), -math.inf)
    zeros = torch.zeros_like(q[..., :1])
    return F.scaled_dot_product_attention(zeros, zeros[..., :1, :].expand(*k.shape[:-1], 1), v,
                                          attn_mask=scores)


@pytest.mark.parametrize("name, shortcut", [
    ("ring_attention_simulated", lambda q, k, v, world_size, causal=False:
        reference_ring.ring_attention_simulated(q, k, v, world_size, causal=causal)),
    ("ring_work", reference_ring.ring_work),
    ("striped_positions", lambda seq_len, world_size:
        reference_ring.layout_positions(seq_len, world_size, "striped")),
    ("linear_attention_parallel", lambda q, k, v, causal=False:
        reference_linear.linear_attention(q, k, v, causal=causal)),
    ("linear_attention_chunked", lambda q, k, v, chunk_size:
        reference_linear.linear_attention(q, k, v, causal=True, method="chunked",
                                          chunk_size=chunk_size)),
])
def test_shortcuts_pass_visible_but_fail_hidden(hidden, name, shortcut):
    getattr(checks, name)(shortcut)  # the numbers are right...
    # ...but the grader sees the reference being called
    expect_hidden_failure(lambda: getattr(hidden, name)(shortcut), "ShortcutUsed")


def test_attention_in_disguise_fails_hidden(hidden):
    expect_hidden_failure(lambda: hidden.linear_attention_parallel(_sdpa_linear), "ShortcutUsed")


def test_recurrent_through_the_reference_fails_hidden(hidden):
    def shortcut(q, k, v, state=None):
        out = reference_linear.linear_attention(q, k, v, causal=True, method="recurrent")
        phi_k = reference_linear.elu_feature_map(k)
        return out, (phi_k.transpose(-2, -1) @ v, phi_k.sum(-2))
    expect_hidden_failure(lambda: hidden.linear_attention_recurrent(shortcut), "ShortcutUsed")


# --- a student cell that patched the kernel cannot change a hidden verdict ---

def test_hidden_verdicts_survive_a_patched_kernel(monkeypatch, solution):
    wrong = WRONG_PARALLEL["normaliser"][0]
    monkeypatch.setattr(torch, "allclose", lambda *args, **kwargs: True)
    monkeypatch.setattr(numpy, "allclose", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.testing, "assert_close", lambda *args, **kwargs: None)
    monkeypatch.setattr(helpers.linear_attention, "linear_attention",
                        lambda q, k, v, causal=False, **kw: wrong(q, k, v, causal))
    hidden = lesson("08")  # loaded after the patches, as the hidden test cell does
    expect_hidden_failure(lambda: hidden.linear_attention_parallel(wrong))
    hidden.linear_attention_parallel(solution["linear_attention_parallel"])
    expect_hidden_failure(lambda: hidden.ring_attention_simulated(WRONG_RINGS["merge"][0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_solution_runs_on_cuda(solution):
    q, k, v = (torch.randn(2, 3, 12, 8, device="cuda") for _ in range(3))
    out = solution["ring_attention_simulated"](q, k, v, 3, causal=True)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.device.type == "cuda" and float((out - expected).abs().max()) < 1e-5
    for name in ("linear_attention_parallel", "linear_attention_recurrent"):
        result = solution[name](q, k, v)
        out = result[0] if isinstance(result, tuple) else result
        assert out.device.type == "cuda"
    assert solution["linear_attention_chunked"](q, k, v, 5).device.type == "cuda"
