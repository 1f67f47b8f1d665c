"""helpers.device: device choice, seeding, and the grading-mode switch."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from helpers.device import get_device, is_autograding, one_cpu_thread, seed_everything

NO_ACCELERATOR = not torch.cuda.is_available() and not torch.backends.mps.is_available()


@pytest.fixture(autouse=True)
def no_device_variable(monkeypatch):
    monkeypatch.delenv("ATTENTION_COURSE_DEVICE", raising=False)


@pytest.mark.skipif(not NO_ACCELERATOR, reason="this machine has a GPU")
def test_cpu_when_there_is_no_accelerator():
    assert get_device() == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_first_when_present():
    assert get_device().type == "cuda"


def test_prefer_wins():
    # "meta" is a device every torch build has and get_device never picks on its own.
    assert get_device(prefer="meta") == torch.device("meta")
    assert get_device(prefer="cpu") == torch.device("cpu")


def test_environment_variable_pins_the_device(monkeypatch):
    monkeypatch.setenv("ATTENTION_COURSE_DEVICE", "meta")
    assert get_device() == torch.device("meta")
    assert get_device(prefer="cpu") == torch.device("cpu")  # an explicit prefer still wins


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_missing_cuda_says_so():
    with pytest.raises(RuntimeError, match="CUDA"):
        get_device(prefer="cuda")


def _draws(generator: torch.Generator):
    return (torch.randn(5), np.random.rand(5), random.random(),
            torch.randn(3, generator=generator))


def test_seed_everything_repeats_torch_numpy_and_random():
    first = _draws(seed_everything(123))
    second = _draws(seed_everything(123))
    other = _draws(seed_everything(124))
    assert torch.equal(first[0], second[0]) and not torch.equal(first[0], other[0])
    assert np.array_equal(first[1], second[1]) and not np.array_equal(first[1], other[1])
    assert first[2] == second[2] and first[2] != other[2]
    assert torch.equal(first[3], second[3]) and not torch.equal(first[3], other[3])


@pytest.mark.parametrize("value,expected", [(None, False), ("", False),
                                            ("autograde", True), ("validate", True)])
def test_is_autograding_follows_nbgrader_execution(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    else:
        monkeypatch.setenv("NBGRADER_EXECUTION", value)
    assert is_autograding() is expected


def test_one_cpu_thread_restores_the_thread_count():
    before = torch.get_num_threads()
    with one_cpu_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
