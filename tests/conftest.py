import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread: the same kernels and summation order in every run a test compares."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def lone_process(monkeypatch):
    """A process outside any launcher, on the CPU. A trainer sets the launcher's variables for its group of one;
    they are undone after the test (setting each first registers its original value, or its absence, for the
    undo: a bare delenv of an absent key registers nothing, so what the trainer set leaked into later tests,
    and a later subprocess joined a process group on a stale MASTER_PORT)."""
    for key in LAUNCHER_ENV:
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
