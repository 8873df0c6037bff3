import socket
import urllib.request

import pytest
import torch
from torch import nn


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (use it wherever code could download)."""

    def refuse(*args, **kwargs):
        raise AssertionError("test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


class Quadratic(nn.Module):
    """L(θ) = ½ θᵀAθ + bᵀθ with A = U diag(h) Uᵀ: every curvature quantity is known in closed form."""

    def __init__(self, eigenvalues, seed=0, dtype=torch.float64):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        h = torch.as_tensor(eigenvalues, dtype=dtype)
        n = h.numel()
        u = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=dtype)).Q
        self.register_buffer("A", u @ torch.diag(h) @ u.T)
        self.register_buffer("b", torch.randn(n, generator=gen, dtype=dtype))
        self.theta = nn.Parameter(torch.randn(n, generator=gen, dtype=dtype))
        self.eigenvalues = torch.sort(h, descending=True).values
        self.eigenvectors = u

    def forward(self):
        return 0.5 * self.theta @ self.A @ self.theta + self.b @ self.theta


def planted_spectrum(n=40, top=(10.0, 8.0, 7.0), bottom=-3.0, seed=0):
    """Eigenvalues with a known top-3, a known most negative one and the rest in (bottom, 5)."""
    gen = torch.Generator().manual_seed(seed + 100)
    rest = torch.rand(n - len(top) - 1, generator=gen, dtype=torch.float64) * 5.0 + bottom * 0.6
    return torch.cat(
        [torch.tensor(top, dtype=torch.float64), torch.tensor([bottom], dtype=torch.float64), rest]
    )


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny: intra-op threads gain nothing and, on a shared 2-core machine, make small
    linear algebra several times slower through contention (measured 5-20x on this project's tests)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
