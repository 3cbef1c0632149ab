import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread: the same kernels and summation order in every run a test compares."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
