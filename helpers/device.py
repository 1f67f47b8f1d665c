"""Where tensors live and how runs repeat: device choice, seeding, and grading mode."""

from __future__ import annotations

import os
import random
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def get_device(prefer: str | None = None) -> torch.device:
    """The device to run on: ``prefer`` if given, else CUDA, then Apple's MPS, then the CPU.

    ``prefer`` also comes from the ``ATTENTION_COURSE_DEVICE`` environment variable, so a
    whole course run can be pinned to ``cpu`` on a machine that has a GPU.
    """
    prefer = prefer or os.environ.get("ATTENTION_COURSE_DEVICE")
    if prefer:
        device = torch.device(prefer)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {prefer!r} asked for, but torch sees no CUDA GPU")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError(f"device {prefer!r} asked for, but MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices) so that a run repeats exactly.

    Returns a CPU generator seeded the same way, for code that wants its own stream.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def is_autograding() -> bool:
    """True while nbgrader executes the notebook, so long experiments can shrink.

    nbgrader sets ``NBGRADER_EXECUTION`` (to ``autograde`` or ``validate``) in the kernel.
    """
    return bool(os.environ.get("NBGRADER_EXECUTION"))


@contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block, then restore the thread count.

    The course's toy models multiply tiny matrices (32 x 32): splitting such operations over
    threads costs more than it saves, and on a busy CPU it can be ten times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages that operators create while it is active, and
    takes them off the count when the storage dies: the live total and its peak."""

    def __init__(self) -> None:
        super().__init__()
        self.known: dict[int, int] = {}  # id of each storage alive -> its bytes counted here
        self.live = self.peak = 0

    def _track(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        self.known[id(storage)] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._forget, id(storage))

    def _forget(self, key: int) -> None:
        self.live -= self.known.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for arg in tree_leaves((args, kwargs)):  # storages from before: not new memory
            if isinstance(arg, torch.Tensor) and id(arg.untyped_storage()) not in self.known:
                self._track(arg.untyped_storage(), 0)
        result = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(result):
            if isinstance(tensor, torch.Tensor) and id(tensor.untyped_storage()) not in self.known:
                self._track(tensor.untyped_storage(), tensor.untyped_storage().nbytes())
        return result


def peak_memory(fn: Callable[[], object], device: torch.device | str | None = None) -> int:
    """Bytes of tensor memory that ``fn()`` holds at its peak, beyond what existed before.

    On CUDA, the caching allocator's own peak (``torch.cuda.max_memory_allocated``). Elsewhere
    every storage an operator creates is counted from its creation until it is freed: the
    intermediates of a Python-level computation (the (L, S) scores of attention, say) are all
    seen; the scratch buffers inside one fused kernel are not. The counter sees the calling
    thread only, so there ``fn`` runs with one torch thread (code that spreads work over
    threads of its own then runs it in this one).
    """
    device = torch.device(device) if device is not None else get_device()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    counter = _LiveTensorBytes()
    with one_cpu_thread(), counter:
        fn()
    return counter.peak
