"""Ring attention: one long sequence split over P devices, K/V blocks passed around a ring
(lesson 08).

Liu, Zaharia & Abbeel (2023), "Ring Attention with Blockwise Transformers for Near-Infinite
Context": device ``r`` keeps its block of queries and, in ``P`` steps, sees every block of
keys and values. At step ``s`` it holds the K/V block of device ``(r - s) mod P`` and merges
that block's attention into its running result with the online softmax of lesson 06
(:func:`helpers.flash.block_attention` and :func:`helpers.flash.merge_attention`); then it
sends the block to device ``r + 1`` and receives the next from device ``r - 1``. No device
ever holds more than two K/V blocks, and the transfer of the next block overlaps the compute
on this one.

Which tokens a device holds is its *layout*, ``positions[r]`` (see :func:`layout_positions`):

- ``"contiguous"``: device ``r`` holds tokens ``r·n .. (r+1)·n - 1``, ``n = L / P``. With a
  causal mask, device ``r`` sees ``r`` full blocks and one half block while device 0 sees a
  half block only: the load is unbalanced and the ring runs at the pace of its last device.
- ``"striped"`` (Brandon et al., 2023, "Striped Attention: Faster Ring Attention for Causal
  Transformers"): device ``r`` holds tokens ``r, r + P, r + 2P, ...``; every block pair is
  then about half visible, so every device does about the same work.
- ``"zigzag"``: the sequence in ``2P`` chunks, device ``r`` holding chunks ``r`` and
  ``2P - 1 - r`` (one early, one late), the layout of Llama 3's context parallelism.

Shapes follow the course: q (..., L, D), k (..., S, D), v (..., S, Dv). A causal mask is
aligned bottom right, as :func:`helpers.attention.causal_mask`: query ``i`` (at sequence
position ``S - L + i``) sees the keys at positions ``0 .. S - L + i``.

:func:`ring_attention_simulated` runs the ring as a loop over virtual devices in one process;
:func:`ring_attention` is the real thing, one rank per process of a ``torch.distributed``
group, differentiable (the backward passes dK and dV around the ring too);
:func:`run_on_processes` starts such a group of local processes (gloo on the loopback
interface).
"""

from __future__ import annotations

import ctypes
import math
import os
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers.attention import check_qkv
from helpers.flash import block_attention, block_attention_backward, merge_attention

LAYOUTS = ("contiguous", "striped", "zigzag")


# --- which tokens each device holds ---

def layout_positions(seq_len: int, world_size: int, layout: str = "contiguous",
                     device: torch.device | str | None = None) -> torch.Tensor:
    """(P, seq_len / P) int64: ``positions[r]`` are the sequence positions device ``r`` holds,
    in the order it holds them (see the module's docstring for the three layouts)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout should be one of {LAYOUTS}, got {layout!r}")
    if world_size < 1:
        raise ValueError(f"world_size should be at least 1, got {world_size}")
    parts = 2 * world_size if layout == "zigzag" else world_size
    if seq_len % parts:
        raise ValueError(f"a sequence of {seq_len} tokens does not split evenly into "
                         f"{parts} {'chunks' if layout == 'zigzag' else 'blocks'} for the "
                         f"{layout} layout over {world_size} devices: pad it to a multiple "
                         f"of {parts}")
    tokens = torch.arange(seq_len, device=device)
    if layout == "contiguous":
        return tokens.view(world_size, -1)  # (P, n): block r
    if layout == "striped":
        return tokens.view(-1, world_size).T.contiguous()  # (P, n): r, r + P, r + 2P, ...
    chunks = tokens.view(parts, -1)  # (2P, n / 2)
    return torch.cat([chunks[:world_size], chunks.flip(0)[:world_size]], dim=1)  # r, 2P-1-r


def _block_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, offset: int, device: torch.device
                ) -> torch.Tensor | None | bool:
    """The causal mask (n_q, n_k) between queries at ``q_pos + offset`` and keys at ``k_pos``:
    ``None`` when every key is visible, ``False`` when none is (the block can be skipped)."""
    allowed = k_pos[None, :] <= q_pos[:, None] + offset  # (n_q, n_k)
    if bool(allowed.all()):
        return None
    if not bool(allowed.any()):
        return False
    return allowed.to(device)


# --- the ring in one process ---

def ring_attention_simulated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             world_size: int, causal: bool = False, scale: float | None = None,
                             layout: str = "contiguous") -> torch.Tensor:
    """Attention computed as P devices in a ring would, in one process: equal to full attention.

    q (..., L, D), k (..., S, D), v (..., S, Dv) -> (..., L, Dv). Virtual device ``r`` holds
    the queries and keys at ``layout_positions(.., P, layout)[r]``; at each of the ``P`` steps
    every device merges the K/V block it holds into its result, then passes the block to
    device ``r + 1``. ``causal`` is bottom right, as ``helpers.attention.causal_mask``.
    """
    check_qkv(q, k, v)
    L, S = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q_pos = layout_positions(L, world_size, layout)  # (P, L/P) on the CPU, for the masks
    k_pos = layout_positions(S, world_size, layout)  # (P, S/P)
    q_rows, k_rows = q_pos.to(q.device), k_pos.to(q.device)  # the same, to index with
    held = [(k[..., k_rows[r], :], v[..., k_rows[r], :], r) for r in range(world_size)]
    results = []
    for r in range(world_size):  # every device starts with nothing: out 0, lse -inf
        out = q.new_zeros(*q.shape[:-2], q_pos.shape[1], v.shape[-1])  # (..., L/P, Dv)
        results.append((out, torch.full(out.shape[:-1], -math.inf, dtype=q.dtype,
                                        device=q.device)))
    for _ in range(world_size):
        for r, (k_block, v_block, source) in enumerate(held):
            mask = _block_mask(q_pos[r], k_pos[source], S - L, q.device) if causal else None
            if mask is False:
                continue  # every key of this block lies in the future of every query here
            partial = block_attention(q[..., q_rows[r], :], k_block, v_block, scale, mask)
            results[r] = merge_attention(*results[r], *partial)
        held = [held[(r - 1) % world_size] for r in range(world_size)]  # r receives from r - 1
    out = q.new_empty(*q.shape[:-1], v.shape[-1])  # (..., L, Dv)
    for r, (block_out, _) in enumerate(results):
        out[..., q_rows[r], :] = block_out
    return out


def ring_work(positions: torch.Tensor, causal: bool = True, offset: int = 0) -> torch.Tensor:
    """(P steps, P devices) int64: how many (query, key) pairs device ``r`` scores at step ``s``.

    ``positions`` (P, n) as from :func:`layout_positions` (the same layout for queries and
    keys, queries shifted by ``offset`` = S - L). At step ``s`` device ``r`` holds the keys of
    device ``(r - s) mod P``; a causal pair counts when the key is not after the query.
    """
    P = positions.shape[0]
    if not causal:
        return torch.full((P, P), positions.shape[1] ** 2, dtype=torch.int64)
    steps, devices = torch.arange(P)[:, None], torch.arange(P)[None, :]
    sources = (devices - steps) % P  # (P steps, P devices): whose keys device r holds
    q_pos = positions[None, :, :, None] + offset  # (1, P, n, 1)
    k_pos = positions[sources][:, :, None, :]  # (P, P, 1, n)
    return (k_pos <= q_pos).sum(dim=(-2, -1))  # (P, P)


def ring_bytes_per_device(batch: int, heads: int, seq_len: int, head_dim: int, world_size: int,
                          bytes_per_element: int = 2, backward: bool = False) -> int:
    """Bytes each device sends in one ring attention (its peers receive as much).

    Forward: its K and V blocks, (B, H, L/P, D) each, pass ``P - 1`` times. The backward also
    passes K and V ``P - 1`` times and the gradients dK and dV ``P`` times (the last pass
    brings them home).
    """
    block = batch * heads * (seq_len // world_size) * head_dim * bytes_per_element
    passes = (world_size - 1) * 2  # K and V, P - 1 times
    if backward:
        passes += (world_size - 1) * 2 + (world_size * 2 if world_size > 1 else 0)
    return passes * block


# --- the ring over real processes ---

class _Ring:
    """This rank's place in the ring of ``group``: who sends to it, whom it sends to."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        if self.rank < 0:
            raise ValueError(f"process {dist.get_rank()} is not a member of the group it "
                             "passed to ring_attention: call it on the group's ranks only")
        members = group or dist.group.WORLD
        self.send_to = dist.get_global_rank(members, (self.rank + 1) % self.size)
        self.recv_from = dist.get_global_rank(members, (self.rank - 1) % self.size)

    def start_pass(self, tensors: list[torch.Tensor], tag: int
                   ) -> tuple[list[torch.Tensor], list[dist.Work]]:
        """Send ``tensors`` to the next rank and receive as many from the previous one, without
        waiting: returns the buffers that will hold what arrives, and the pending works."""
        if self.size == 1:
            return tensors, []
        received = [torch.empty_like(t) for t in tensors]
        works = []
        for i, (out, into) in enumerate(zip(tensors, received)):
            works.append(dist.isend(out, self.send_to, group=self.group, tag=tag + i))
            works.append(dist.irecv(into, self.recv_from, group=self.group, tag=tag + i))
        return received, works


def _wait(works: list[dist.Work]) -> None:
    for work in works:
        work.wait()


_KV_TAG, _GRAD_TAG = 0, 2  # K, V use tags 0 and 1; dK, dV tags 2 and 3


def _masks(ring: _Ring, q: torch.Tensor, k: torch.Tensor, causal: bool, layout: str
           ) -> list[torch.Tensor | None | bool]:
    """The mask of each step's block pair for this rank (None: all visible; False: skip)."""
    if not causal:
        return [None] * ring.size
    L, S = q.shape[-2] * ring.size, k.shape[-2] * ring.size
    q_pos = layout_positions(L, ring.size, layout)[ring.rank]
    k_pos = layout_positions(S, ring.size, layout)
    return [_block_mask(q_pos, k_pos[(ring.rank - step) % ring.size], S - L, q.device)
            for step in range(ring.size)]


def _ring_forward(ring: _Ring, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  masks: list, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's out (..., n, Dv) and lse (..., n) over the keys of every rank."""
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])  # (..., n, Dv)
    lse = torch.full(q.shape[:-1], -math.inf, dtype=q.dtype, device=q.device)  # (..., n)
    for step, mask in enumerate(masks):
        last = step == ring.size - 1
        if not last:  # start moving the next block before computing on this one
            (k_next, v_next), moving = ring.start_pass([k, v], _KV_TAG)
        if mask is not False:
            out, lse = merge_attention(out, lse, *block_attention(q, k, v, scale, mask))
        if not last:
            _wait(moving)
            k, v = k_next, v_next
    return out, lse


def _ring_backward(ring: _Ring, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor, masks: list,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of this rank's blocks. K/V go round the ring again; with each block travels
    the sum of the gradients the ranks it visited have found for it, dK and dV, which after
    ``P`` passes arrive back at the block's own rank."""
    delta = (dout * out).sum(-1)  # (..., n)
    dq = torch.zeros_like(q)
    dk_dv, arriving = None, []  # the gradients of the block held now, as received
    for step, mask in enumerate(masks):
        last = step == ring.size - 1
        if not last:
            (k_next, v_next), moving = ring.start_pass([k, v], _KV_TAG)
        if mask is False:  # a block in the future: nothing to add to its gradients
            dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        else:
            dq_block, dk, dv = block_attention_backward(q, k, v, dout, lse, delta, scale, mask)
            dq = dq + dq_block
        if dk_dv is not None:
            _wait(arriving)  # what the previous rank found for this block
            dk, dv = dk + dk_dv[0], dv + dk_dv[1]
        dk_dv, arriving = ring.start_pass([dk, dv], _GRAD_TAG)
        if not last:
            _wait(moving)
            k, v = k_next, v_next
    _wait(arriving)  # after P passes, this rank's own block is back with all its gradients
    return dq, dk_dv[0], dk_dv[1]


def _check_same_blocks(ring: _Ring, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise the same ValueError on every rank unless all ranks hold blocks of one shape (a
    block of another size would never match its neighbour's receive buffer)."""
    if ring.size == 1:
        return
    shapes = torch.zeros(3, 9, dtype=torch.int64)  # ndim, then up to 8 sizes, per tensor
    for row, t in zip(shapes, (q, k, v)):
        if t.dim() > 8:
            raise ValueError(f"ring_attention takes tensors of at most 8 dims, got {t.dim()}")
        row[0], row[1:t.dim() + 1] = t.dim(), torch.tensor(t.shape)
    largest, smallest = shapes.clone(), shapes.clone()
    dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=ring.group)
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN, group=ring.group)
    if not torch.equal(largest, smallest):
        raise ValueError(f"ring_attention needs blocks of one shape on every rank; rank "
                         f"{ring.rank} has q {tuple(q.shape)}, k {tuple(k.shape)}, v "
                         f"{tuple(v.shape)} and another rank differs: split the sequence into "
                         f"{ring.size} equal blocks (pad it to a multiple of {ring.size})")


class _RingAttention(torch.autograd.Function):
    """Ring attention with a ring backward: autograd never sees the communication."""

    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, layout):
        ring = _Ring(group)
        _check_same_blocks(ring, q, k, v)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        masks = _masks(ring, q, k, causal, layout)
        out, lse = _ring_forward(ring, q, k, v, masks, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.masks, ctx.scale = ring, masks, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        # dout may be a strided view (loss.sum() gives an expanded one): make it dense once
        # here; gloo collectives have returned wrong gradients for such tensors (COURSE.md),
        # and the tests send one through the ring
        dq, dk, dv = _ring_backward(ctx.ring, q, k, v, out, lse, dout.contiguous(), ctx.masks,
                                    ctx.scale)
        return dq, dk, dv, None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   group: dist.ProcessGroup | None = None, causal: bool = False,
                   scale: float | None = None, layout: str = "contiguous") -> torch.Tensor:
    """Ring attention (Liu et al., 2023) on a ``torch.distributed`` process group.

    Called on every rank of ``group`` (the default group when ``None``) with that rank's
    blocks q (..., L/P, D), k (..., S/P, D), v (..., S/P, Dv), the tokens
    ``layout_positions(L, P, layout)[rank]`` of the sequence; returns this rank's output
    block (..., L/P, Dv), equal to the matching rows of full attention. Each step sends the
    K/V block on with ``isend``/``irecv`` while it computes. Differentiable: the backward
    sends K/V round again, and dK/dV with them, so every rank gets the gradients of its own
    blocks. ``causal`` is bottom right, as ``helpers.attention.causal_mask``.
    """
    if not dist.is_initialized():
        raise RuntimeError("ring_attention needs a torch.distributed process group: call it "
                           "on every rank after init_process_group (run_on_processes starts "
                           "one), or use ring_attention_simulated in a single process")
    check_qkv(q, k, v)
    if layout not in LAYOUTS:
        raise ValueError(f"layout should be one of {LAYOUTS}, got {layout!r}")
    if layout == "zigzag" and causal and (q.shape[-2] % 2 or k.shape[-2] % 2):
        raise ValueError(f"the zigzag layout holds two equal chunks per rank: the blocks need "
                         f"an even length, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _RingAttention.apply(q, k, v, group, causal, scale, layout)


# --- local processes ---

def _loopback_interface() -> str:
    """The name of the loopback interface, for gloo: ``lo`` on Linux, ``lo0`` on macOS."""
    names = [name for _, name in socket.if_nameindex()]
    return next((name for name in ("lo", "lo0") if name in names), names[0] if names else "lo")


def _exit_when_orphaned(parent: int) -> None:
    """End this process as soon as process ``parent`` has ended (checked every half second,
    on a daemon thread): a forkserver's child outlives the program that asked for it."""
    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(parent, 0)  # signal 0: only asks whether the process exists
            except ProcessLookupError:
                os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _process(rank: int, world_size: int, fn: Callable, args: tuple, threads: int,
             folder: str, timeout_s: float, parent: int) -> None:
    """One new process: join the gloo group, run ``fn(rank, world_size, *args)``, save its
    result in ``folder``; end early if process ``parent`` (the caller) ends.

    The ranks meet through a file in ``folder`` (no port to agree on, so no race with other
    programs for one); gloo then connects them over the loopback interface."""
    _exit_when_orphaned(parent)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'rendezvous')}",
                            rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    try:
        try:
            result = fn(rank, world_size, *args)
        except BaseException:
            # tell the parent now: once this process closes its connections, the others
            # fail too, and their errors must not hide this one
            with open(os.path.join(folder, f"{rank}.error"), "w") as report:
                report.write(traceback.format_exc())
            raise
        torch.save(result, os.path.join(folder, f"{rank}.pt"))
        dist.barrier()  # nobody leaves while another may still be connecting to it
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the result is saved: skip the interpreter's teardown of torch (seconds)


class ProcessFailed(RuntimeError):
    """A process started by :func:`run_on_processes` raised; the message has its traceback."""


def _start_method() -> str:
    """``forkserver`` where there is one (Linux, macOS): a server process imports torch once
    and forks every later process from itself, which starts them in a fraction of the time
    that ``spawn`` takes to import torch in each. ``spawn`` elsewhere (Windows)."""
    if "forkserver" not in mp.get_all_start_methods():
        return "spawn"
    mp.set_forkserver_preload(["helpers.ring"])  # only used when the server starts
    return "forkserver"


def run_on_processes(fn: Callable, world_size: int, *args: object, threads: int = 1,
                     timeout_s: float = 120.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` new local processes, each one rank
    of a gloo process group on the loopback interface, and return their results by rank.

    The processes do not copy this one (they are started by ``forkserver``, or ``spawn``), so
    ``fn`` must be importable (a function of a module, not of a notebook: ``helpers.ring``
    has the workers the lesson uses), and its arguments and result picklable. Each process
    runs torch on ``threads`` threads. An error in ``fn`` raises :class:`ProcessFailed` here,
    with the traceback of the process that failed first; ``timeout_s`` bounds every
    collective and the whole run.
    """
    if world_size < 1:
        raise ValueError(f"world_size should be at least 1, got {world_size}")
    in_notebook = fn.__module__ == "__main__" and not hasattr(sys.modules["__main__"], "__file__")
    if in_notebook or "<" in fn.__qualname__:  # a notebook's function, a lambda, a closure
        raise ValueError(f"{fn.__qualname__} cannot be sent to a new process: define it in an "
                         "importable module (a notebook's functions are not), e.g. use the "
                         "workers of helpers.ring")
    with tempfile.TemporaryDirectory(prefix="ring-") as folder:
        processes = mp.start_processes(
            _process, args=(world_size, fn, args, threads, folder, timeout_s, os.getpid()),
            nprocs=world_size, join=False, start_method=_start_method())
        deadline = time.monotonic() + timeout_s
        try:
            while not processes.join(timeout=0.2):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the {world_size} processes did not finish in "
                                       f"{timeout_s} s")
        except BaseException as error:  # a failure, the timeout, an interrupt: stop them all
            for process in processes.processes:
                if process.is_alive():
                    process.terminate()
            reports = sorted(Path(folder).glob("*.error"), key=lambda p: p.stat().st_mtime_ns)
            if not isinstance(error, mp.ProcessRaisedException) or not reports:
                raise
            first = reports[0]
            raise ProcessFailed(f"rank {first.stem} of {world_size} raised first (the others may "
                                f"have failed because of it):\n{first.read_text()}") from error
        return [torch.load(os.path.join(folder, f"{rank}.pt"), weights_only=False)
                for rank in range(world_size)]


# --- what the lesson and the tests run on every rank ---

def _return_freed_memory_to_the_os() -> None:
    """Make glibc's malloc hand every large freed block back to the OS at once (Linux), so
    that the peak resident memory of this process measures its live tensors."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: mmap above 64 KiB
    except (OSError, AttributeError):
        pass  # not glibc: the peak still bounds the live tensors from above


def _status_bytes(field: str) -> int | None:
    """A memory line of Linux's /proc/self/status (``VmRSS``, ``VmHWM``) in bytes, or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def _start_memory_peak() -> int:
    """Reset this process's peak resident memory (Linux) and return its resident bytes now.

    Where the peak cannot be reset, returns the peak since the process started, so that
    :func:`_memory_peak` minus it is the growth of that peak."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # the kernel's documented way to reset VmHWM
        return _status_bytes("VmRSS") or 0
    except OSError:
        return _memory_peak()


def _memory_peak() -> int:
    """This process's peak resident bytes since the last reset (Linux) or since it started."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource  # Unix only
    except ImportError:
        return 0  # no measure of memory here (Windows): every growth reads as 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS bytes, Linux kB


def full_inputs(batch: int, heads: int, seq_len: int, head_dim: int, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """The same random q, k, v (B, H, L, D) on every rank: each rank draws them from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, seq_len, head_dim, generator=generator, dtype=dtype)
                 for _ in range(3))


def _error_against_full_attention(rows: torch.Tensor, inputs: tuple[torch.Tensor, ...],
                                  blocks: tuple[torch.Tensor, ...], out: torch.Tensor,
                                  causal: bool, group: dist.ProcessGroup) -> float:
    """Largest difference between this rank's ring output and gradients and the same rows of
    PyTorch's SDPA over the whole sequence, differentiated by autograd (loss: the sum)."""
    q_all, k_all, v_all = (t.detach().clone().requires_grad_() for t in inputs)
    mask = None
    if causal:
        mask = torch.ones(k_all.shape[-2], k_all.shape[-2], dtype=torch.bool).tril()[rows]
    expected = torch.nn.functional.scaled_dot_product_attention(q_all[..., rows, :], k_all,
                                                                v_all, attn_mask=mask)
    expected.sum().backward()
    for grad in (k_all.grad, v_all.grad):  # every rank's queries add to every key's gradient
        dist.all_reduce(grad, group=group)
    pairs = [(out, expected), (blocks[0].grad, q_all.grad[..., rows, :]),
             (blocks[1].grad, k_all.grad[..., rows, :]), (blocks[2].grad, v_all.grad[..., rows, :])]
    return max(float((a - b.detach()).abs().max()) for a, b in pairs)


def ring_scaling(rank: int, world_size: int, batch: int, heads: int, seq_len: int,
                 head_dim: int, world_sizes: tuple[int, ...], causal: bool = False,
                 repeats: int = 1) -> dict[int, dict[str, float]]:
    """A worker for :func:`run_on_processes`: for each ``P`` in ``world_sizes``, the first
    ``P`` ranks run :func:`ring_attention` forward and backward over one sequence of
    ``seq_len`` tokens, each holding ``seq_len / P`` of them (contiguous layout).

    Returns this rank's ``{P: {"seconds", "cpu_seconds", "peak_bytes", "max_error"}}``: the
    median wall time of ``repeats`` forward + backward passes and the CPU time of the thread
    that computes them (torch on one thread: what the rank computed, whatever else shares
    the cores), how far the process's resident memory rose above where it started during
    them (its peak, reset before each pass on Linux), and the largest difference of the
    output and gradients from PyTorch's SDPA.
    """
    _return_freed_memory_to_the_os()
    inputs = full_inputs(batch, heads, seq_len, head_dim)
    warm = full_inputs(1, 1, 2, 4)  # the first call sets up gloo's buffers: not measured
    ring_attention(*(t.requires_grad_() for t in warm)).sum().backward()
    measured = {}
    # the largest P (the smallest blocks) first: where the peak cannot be reset (not Linux),
    # each run then raises the peak above the last one's, and its growth still shows
    for P in sorted(world_sizes, reverse=True):
        group = dist.new_group(ranks=list(range(P)))  # every rank must take part in new_group
        if rank < P:
            rows = layout_positions(seq_len, P)[rank]
            times, cpu_times, peaks = [], [], []
            for _ in range(repeats):
                blocks = tuple(t[..., rows, :].clone().requires_grad_() for t in inputs)
                dist.barrier(group)
                before = _start_memory_peak()
                start, cpu_start = time.perf_counter(), time.thread_time()
                out = ring_attention(*blocks, group=group, causal=causal)
                out.sum().backward()
                times.append(time.perf_counter() - start)
                cpu_times.append(time.thread_time() - cpu_start)
                peaks.append(max(0, _memory_peak() - before))
            error = _error_against_full_attention(rows, inputs, blocks, out.detach(), causal,
                                                  group)
            measured[P] = {"seconds": sorted(times)[len(times) // 2],
                           "cpu_seconds": sorted(cpu_times)[len(cpu_times) // 2],
                           "peak_bytes": max(peaks), "max_error": error}
        dist.barrier()
    return measured
