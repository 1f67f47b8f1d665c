"""Where tensors live and how runs repeat: device choice, seeding, and grading mode."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


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
