"""The metric guard puts every torchmetrics metric back as it was, copying only what changed."""

import torch
from torchmetrics import CatMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_chaos.callbacks._batch import MetricGuard


def states(metric):
    value = {
        k: v.clone() if isinstance(v, torch.Tensor) else [t.clone() for t in v]
        for k, v in metric.metric_state.items()
    }
    return value, metric._update_count


def same(a, b):
    (sa, ca), (sb, cb) = a, b
    if ca != cb or sa.keys() != sb.keys():
        return False
    for k in sa:
        x, y = sa[k], sb[k]
        if isinstance(x, list):
            if len(x) != len(y) or not all(torch.equal(u, v) for u, v in zip(x, y)):
                return False
        elif not torch.equal(x, y):
            return False
    return True


def test_every_way_a_block_changes_a_metric_is_undone():
    acc, cat = MulticlassAccuracy(num_classes=3), CatMetric()
    guard = MetricGuard([acc, cat])
    logits, labels = torch.randn(6, 3), torch.randint(0, 3, (6,))
    acc.update(logits, labels)
    cat.update(torch.ones(2))
    for change in (
        lambda: acc.update(logits, labels),  # in place, counted
        lambda: acc(logits, labels),  # forward: states rebound
        lambda: acc.reset(),
        lambda: cat.update(torch.zeros(3)),  # a list state grows
        lambda: (acc.compute(), cat.compute()),  # cached results
    ):
        before = states(acc), states(cat)
        with guard:
            change()
        assert same(states(acc), before[0]) and same(states(cat), before[1])
        assert acc._computed is None and cat._computed is None


def test_a_metric_changed_between_blocks_is_copied_again():
    acc = MulticlassAccuracy(num_classes=3)
    guard = MetricGuard([acc])
    logits, labels = torch.randn(6, 3), torch.randint(0, 3, (6,))
    with guard:
        acc.update(logits, labels)  # undone
    acc(logits, labels)  # the training step's update, outside any block
    after_training = states(acc)
    with guard:
        acc.update(logits, labels)
    assert same(states(acc), after_training)  # back to what training left, not to the first copy
    with guard:
        pass
    assert same(states(acc), after_training)
