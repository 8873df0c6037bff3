"""The parameter space: trainable parameters, flat views and back."""

import torch
from torch import nn

from lightning_chaos.core.params import filled, flatten, num_params, trainable_parameters, unflatten


def test_trainable_parameters_skip_frozen_and_list_tied_ones_once():
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2))
    net[1].weight = net[0].weight
    net[2].requires_grad_(False)
    names = [name for name, _ in trainable_parameters(net)]
    assert names == ["0.weight", "0.bias", "1.bias"]
    assert num_params(p for _, p in trainable_parameters(net)) == 9 + 3 + 3


def test_flatten_and_unflatten_round_trip_with_and_without_a_trailing_dimension():
    like = [torch.zeros(2, 3), torch.zeros(4), torch.zeros(1, 1, 2)]
    vector = torch.arange(12.0)
    pieces = unflatten(vector, like)
    assert [p.shape for p in pieces] == [(2, 3), (4,), (1, 1, 2)]
    assert torch.equal(flatten(pieces), vector)
    assert torch.equal(pieces[1], torch.tensor([6.0, 7.0, 8.0, 9.0]))
    block = torch.arange(24.0).reshape(12, 2)
    columns = unflatten(block, like)
    assert [p.shape for p in columns] == [(2, 3, 2), (4, 2), (1, 1, 2, 2)]
    assert torch.equal(columns[1][:, 1], block[6:10, 1])
    assert unflatten(vector.double(), like)[0].dtype == torch.float32  # pieces take the dtype of `like`


def test_filled_replaces_missing_gradients_by_zeros():
    like = [torch.ones(2), torch.ones(3)]
    out = filled([torch.full((2,), 5.0), None], like)
    assert torch.equal(out[0], torch.full((2,), 5.0)) and torch.equal(out[1], torch.zeros(3))
