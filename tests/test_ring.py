"""Ring attention against PyTorch: the simulated ring in one process, and the real one on
gloo processes (forward and backward), both equal to ``F.scaled_dot_product_attention`` and
its autograd gradients, for every layout, causal or not, P = 1 to 4.

The real ring runs on 4 spawned processes once for the whole module (starting processes
costs seconds); each world size P is a subgroup of the first P ranks.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from helpers.ring import (
    LAYOUTS,
    ProcessFailed,
    layout_positions,
    ring_attention,
    ring_attention_simulated,
    ring_bytes_per_device,
    ring_scaling,
    ring_work,
    run_on_processes,
)

# One pytest worker runs this module, so the processes start once.
pytestmark = pytest.mark.xdist_group("ring")

WORLD = 4
B, H, D, DV = 2, 3, 5, 4
# name -> (L, S, causal, layout, dtype, loss): every P in 1..4 splits L, S (zigzag: 2P chunks)
CASES = {
    "full": (12, 12, False, "contiguous", torch.float64, "random"),
    "causal": (12, 12, True, "contiguous", torch.float64, "random"),
    "causal striped": (12, 12, True, "striped", torch.float64, "random"),
    "causal zigzag": (24, 24, True, "zigzag", torch.float64, "random"),
    "full striped": (12, 12, False, "striped", torch.float64, "random"),
    "causal, L < S": (12, 24, True, "contiguous", torch.float64, "random"),
    "full, L > S": (24, 12, False, "contiguous", torch.float64, "random"),
    # loss.sum(): the incoming gradient is an expanded tensor of ones, not contiguous
    "float32, sum loss": (12, 12, True, "contiguous", torch.float32, "sum"),
}


def case_inputs(name: str) -> tuple[torch.Tensor, ...]:
    """q (B, H, L, D), k, v (B, H, S, ...) and dout (B, H, L, Dv) of a case, the same on
    every rank (seeded)."""
    L, S, _, _, dtype, _ = CASES[name]
    g = torch.Generator().manual_seed(sorted(CASES).index(name))
    return tuple(torch.randn(B, H, n, d, generator=g, dtype=dtype)
                 for n, d in ((L, D), (S, D), (S, DV), (L, DV)))


def reference(name: str) -> tuple[torch.Tensor, ...]:
    """out, dq, dk, dv of PyTorch's SDPA over the whole sequence, by autograd."""
    L, S, causal, _, _, loss = CASES[name]
    q, k, v, dout = case_inputs(name)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = causal_lower_right(L, S) if causal else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.sum().backward() if loss == "sum" else out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def ring_cases(rank: int, world_size: int) -> dict:
    """Worker: every case on every subgroup of the first P ranks that this rank belongs to;
    also the bytes this rank sends in one forward and one backward."""
    results = {}
    for P in range(1, world_size + 1):
        group = dist.new_group(ranks=list(range(P)))
        if rank >= P:
            continue
        for name, (L, S, causal, layout, _, loss) in CASES.items():
            q, k, v, dout = case_inputs(name)
            q_rows = layout_positions(L, P, layout)[rank]
            k_rows = layout_positions(S, P, layout)[rank]
            blocks = [q[..., q_rows, :], k[..., k_rows, :], v[..., k_rows, :]]
            blocks = [t.clone().requires_grad_() for t in blocks]
            out = ring_attention(*blocks, group=group, causal=causal, layout=layout)
            out.sum().backward() if loss == "sum" else out.backward(dout[..., q_rows, :])
            results[P, name] = (out.detach(), *(t.grad for t in blocks))
        results[P, "bytes"] = _bytes_sent(group, P)
        if P > 1:  # an uneven split: rank 0 holds one token more than the others
            q = torch.randn(1, 1, 3 + (rank == 0), 2)
            try:
                ring_attention(q, q, q, group=group)
            except ValueError as error:
                results[P, "uneven"] = str(error)
    results["scaling"] = ring_scaling(rank, world_size, 1, 2, 24, 8, (1, 2, 4), True)
    return results


def _bytes_sent(group, P: int) -> tuple[int, int]:
    """Bytes this rank hands to ``dist.isend`` in one forward, then in one backward."""
    sent = []
    original = dist.isend

    def counting(tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)

    q, k, v = (torch.randn(2, 3, 8 // P * 2, 4, requires_grad=True) for _ in range(3))
    dist.isend = counting
    try:
        out = ring_attention(q, k, v, group=group)
        forward = sum(sent)
        out.sum().backward()
    finally:
        dist.isend = original
    return forward, sum(sent) - forward


@pytest.fixture(scope="module")
def real_ring() -> list[dict]:
    return run_on_processes(ring_cases, WORLD, timeout_s=300)


@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_real_ring_equals_full_attention_and_its_gradients(real_ring, P, name):
    L, S, _, layout, dtype, _ = CASES[name]
    expected = reference(name)
    tolerance = {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {}
    for rank in range(P):
        q_rows = layout_positions(L, P, layout)[rank]
        k_rows = layout_positions(S, P, layout)[rank]
        got = real_ring[rank][P, name]
        for what, value, target in zip(("out", "dq", "dk", "dv"), got,
                                       (expected[0][..., q_rows, :], expected[1][..., q_rows, :],
                                        expected[2][..., k_rows, :], expected[3][..., k_rows, :])):
            assert value.dtype == dtype, (what, rank)
            torch.testing.assert_close(value, target, **tolerance, msg=f"{what}, rank {rank}")


@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_bytes_sent_per_device(real_ring, P):
    forward, backward = real_ring[0][P, "bytes"]
    n = 8 // P * 2
    assert forward == ring_bytes_per_device(2, 3, n * P, 4, P, bytes_per_element=4)
    assert forward + backward == ring_bytes_per_device(2, 3, n * P, 4, P, bytes_per_element=4,
                                                       backward=True)
    assert forward == (2 * (P - 1) * 2 * 3 * n * 4 * 4)  # K and V blocks, P - 1 passes


@pytest.mark.parametrize("P", [2, 3, 4])
def test_an_uneven_split_is_refused_on_every_rank(real_ring, P):
    for rank in range(P):
        assert "blocks of one shape on every rank" in real_ring[rank].get((P, "uneven"), "")


def test_scaling_worker_reports_every_world_size(real_ring):
    for rank, results in enumerate(real_ring):
        P_values = [P for P in (1, 2, 4) if rank < P]
        assert sorted(results["scaling"]) == P_values
        for P in P_values:
            measured = results["scaling"][P]
            assert measured["seconds"] > 0 and measured["peak_bytes"] >= 0
            assert measured["max_error"] < 1e-5


def test_ring_attention_needs_a_process_group():
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(RuntimeError, match="process group"):
        ring_attention(q, q, q)


def raises_in_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank one failed on purpose")


def test_an_error_in_a_process_reaches_the_caller():
    with pytest.raises(ProcessFailed, match="rank 1 of 2 raised first(.|\n)*rank one failed"):
        run_on_processes(raises_in_rank_one, 2, timeout_s=120)


def sleeps(rank: int, world_size: int) -> None:
    time.sleep(600)


def test_a_run_past_its_timeout_is_stopped():
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish in 3 s"):
        run_on_processes(sleeps, 2, timeout_s=3)
    assert time.monotonic() - started < 60


def test_run_on_processes_refuses_what_it_cannot_send():
    with pytest.raises(ValueError, match="cannot be sent to a new process"):
        run_on_processes(lambda rank, world_size: rank, 2)


# --- the simulated ring, in this process ---

def sdpa(q, k, v, causal):
    mask = causal_lower_right(q.shape[-2], k.shape[-2]) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("P", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_simulated_ring_equals_full_attention(P, causal, layout):
    g = torch.Generator().manual_seed(P)
    L = S = 2 * P * 3
    q, k, v = (torch.randn(2, 3, n, d, generator=g, dtype=torch.float64)
               for n, d in ((L, 5), (S, 5), (S, 7)))
    out = ring_attention_simulated(q, k, v, P, causal=causal, layout=layout)
    torch.testing.assert_close(out, sdpa(q, k, v, causal), atol=1e-12, rtol=1e-10)


@pytest.mark.filterwarnings("ignore:Lower right causal bias")  # L > S: rows that see nothing
@pytest.mark.parametrize("L, S", [(6, 12), (12, 6), (4, 8)])
@pytest.mark.parametrize("causal", [False, True])
def test_simulated_ring_bottom_right_when_lengths_differ(L, S, causal):
    g = torch.Generator().manual_seed(L + S)
    q, k, v = (torch.randn(3, n, 4, generator=g, dtype=torch.float64) for n in (L, S, S))
    out = ring_attention_simulated(q, k, v, 2, causal=causal, scale=0.7)
    mask = causal_lower_right(L, S) if causal else None
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.7)
    expected = expected.nan_to_num(0.0)  # L > S: the first queries see no key, the course gives 0
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)


def test_simulated_ring_is_differentiable():
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 2, 12, 4, generator=g, dtype=torch.float64, requires_grad=True)
              for _ in range(3)]
    ring_attention_simulated(*inputs, 3, causal=True, layout="striped").square().sum().backward()
    ours = [t.grad for t in inputs]
    copies = [t.detach().clone().requires_grad_() for t in inputs]
    sdpa(*copies, True).square().sum().backward()
    for got, expected in zip(ours, (t.grad for t in copies)):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("bad, message", [
    (dict(seq_len=10, world_size=4), "does not split evenly"),
    (dict(seq_len=12, world_size=4, layout="zigzag"), "8 chunks"),
    (dict(seq_len=12, world_size=2, layout="diagonal"), "layout should be one of"),
])
def test_layouts_reject_what_does_not_split(bad, message):
    with pytest.raises(ValueError, match=message):
        layout_positions(**bad)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_is_a_partition_of_the_sequence(layout):
    positions = layout_positions(24, 3, layout)
    assert positions.shape == (3, 8)
    assert sorted(positions.flatten().tolist()) == list(range(24))


def test_layouts_hold_the_tokens_their_papers_say():
    assert layout_positions(8, 2).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout_positions(8, 2, "striped").tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert layout_positions(8, 2, "zigzag").tolist() == [[0, 1, 6, 7], [2, 3, 4, 5]]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ring_work_counts_the_visible_pairs(layout):
    P, L = 4, 16
    positions = layout_positions(L, P, layout)
    work = ring_work(positions)
    for step in range(P):
        for device in range(P):
            source = (device - step) % P  # held after `step` passes from device - 1
            expected = sum(k <= q for q in positions[device].tolist()
                           for k in positions[source].tolist())
            assert work[step, device] == expected
    assert int(work.sum()) == L * (L + 1) // 2  # every causal pair exactly once
    assert (ring_work(positions, causal=False) == (L // P) ** 2).all()


def test_striping_balances_the_causal_ring():
    contiguous = ring_work(layout_positions(64, 4))
    striped = ring_work(layout_positions(64, 4, "striped"))
    per_device = contiguous.sum(0)
    assert per_device.argmax() == 3 and per_device.argmin() == 0  # the last device works most
    assert striped.sum(0).max() - striped.sum(0).min() <= 4 * 16  # within one diagonal per step
    assert striped.amax(1).sum() < 0.65 * contiguous.amax(1).sum()  # lockstep time: 904 -> 544
    zigzag = ring_work(layout_positions(64, 4, "zigzag"))
    assert (zigzag.sum(0) == zigzag.sum(0)[0]).all()  # every device the same work


def test_communication_volume_formula():
    assert ring_bytes_per_device(1, 1, 8, 2, 1) == 0  # one device sends nothing
    # two devices, bf16: each sends its K and V blocks (4 tokens x 2 dims x 2 bytes) once
    assert ring_bytes_per_device(1, 1, 8, 2, 2) == 2 * 4 * 2 * 2
