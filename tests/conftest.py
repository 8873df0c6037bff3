import socket
import urllib.request

import pytest
import torch
from helpers import Quadratic, planted_spectrum  # noqa: F401  (tests/test_benchmarks.py imports them here)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (use it wherever code could download)."""

    def refuse(*args, **kwargs):
        raise AssertionError("test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny: intra-op threads gain nothing and, on a shared 2-core machine, make small
    linear algebra several times slower through contention (measured 5-20x on this project's tests)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
