"""The parameter space: trainable parameters, flat views and back."""

import torch
from torch import nn

from lightning_chaos.core.params import (
    ModuleLayout,
    filled,
    flatten,
    num_params,
    trainable_parameters,
    unflatten,
)


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


def _walk(module):
    """What the layout must agree with: the module's own walks."""
    return (
        [name for name, _ in module.named_parameters()],
        [name for name, p in module.named_parameters() if p.requires_grad],
        list(module.modules()),
        sorted(name for name, _ in module.named_buffers(remove_duplicate=False)),
    )


def _of(module):
    layout = ModuleLayout.of(module)
    names = [name for name, _ in layout.parameters]
    trainable = [name for name, _ in layout.trainable]
    buffer_slots = sorted(key for slots, _ in layout.buffers for _, key in slots)
    return layout, (names, trainable, layout.modules, buffer_slots)


def test_a_layout_is_cached_until_the_module_changes_and_then_agrees_with_a_fresh_walk():
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    layout, _ = _of(net)
    assert ModuleLayout.of(net) is layout  # nothing changed: no new walk
    changes = [
        lambda: net[2].requires_grad_(False),  # frozen
        lambda: net[2].requires_grad_(True),  # and unfrozen
        lambda: setattr(net[2], "weight", net[0].weight),  # a tie (shapes differ: never evaluated here)
        lambda: net.append(nn.Linear(2, 2)),  # a module appended
        lambda: net[1].register_buffer("extra", torch.zeros(1)),  # a buffer added
        lambda: setattr(net[1], "running_mean", torch.ones(3)),  # a buffer reassigned
        lambda: net[0]._parameters.__setitem__("bias", nn.Parameter(torch.zeros(3))),  # replaced in place
        lambda: delattr(net, "3"),  # a module removed
    ]
    for change in changes:
        change()
        fresh, seen = _of(net)
        assert fresh is not layout, change
        names, trainable, modules, _ = seen
        walked = _walk(net)
        assert (names, trainable, modules) == walked[:3]
        layout = fresh
    # every (dict, key) slot of a tie is known: both names of the tied weight
    assert len(ModuleLayout.of(net).slots(net[0].weight)) == 2


def test_a_layout_does_not_keep_its_module_alive():
    import gc
    import weakref

    net = nn.Linear(2, 2)
    ModuleLayout.of(net)
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None
