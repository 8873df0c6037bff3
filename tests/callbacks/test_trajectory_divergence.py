"""TrajectoryDivergence: twins replay the main run exactly and leave it untouched; divergence baselines."""

import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import MemoryLogger, TinyModule, loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_chaos import CGD, CGDCurvature, TrajectoryDivergence
from lightning_chaos.core.divergence import DIRECTIONS, default_init_distance, random_walk_distance


class CGDTiny(TinyModule):
    def configure_optimizers(self):
        return CGD(
            torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum), strategy="negative"
        )


def fit(callbacks, module_cls=TinyModule, perturb=None, max_steps=6, logger=None, **module_kwargs):
    """Seeded run on unshuffled batches; ``perturb`` (flat) is added to the initial parameters."""
    pl.seed_everything(0, verbose=False)
    model = module_cls(**module_kwargs)
    if perturb is not None:
        with torch.no_grad():
            params = list(model.parameters())
            offset = 0
            for p in params:
                p.add_(perturb[offset : offset + p.numel()].reshape(p.shape).to(p.dtype))
                offset += p.numel()
    tr = trainer(callbacks, logger=logger, max_steps=max_steps)
    tr.fit(model, loader(shuffle=False))
    return model, tr


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_main_run_is_bit_identical_with_twins():
    kwargs = dict(dropout=0.3, batchnorm=True, weight_decay=0.01)
    plain, tr_plain = fit([], **kwargs)
    rng_plain = torch.get_rng_state()
    div = TrajectoryDivergence(init_samples=4)
    watched, tr_watched = fit([div], **kwargs)
    assert torch.equal(rng_plain, torch.get_rng_state())
    for (k, a), b in zip(plain.state_dict().items(), watched.state_dict().values()):
        assert torch.equal(a, b), k  # weights and BatchNorm buffers
    opt_a, opt_b = (t.optimizers[0].state_dict()["state"] for t in (tr_plain, tr_watched))
    assert all(torch.equal(opt_a[i]["momentum_buffer"], opt_b[i]["momentum_buffer"]) for i in opt_a)
    assert set(div.distances) == set(DIRECTIONS) and all(len(d) == 7 for d in div.distances.values())


@pytest.mark.parametrize("module_cls", [TinyModule, CGDTiny], ids=["sgd_momentum", "cgd"])
def test_a_twin_is_the_run_started_from_the_perturbed_point(module_cls):
    """Same batches, same dropout masks, same optimizer: the twin equals a separate run from θ0 + εu."""
    callbacks = [TrajectoryDivergence(directions=["max_chaotic", "random"], init_samples=0)]
    if module_cls is CGDTiny:
        callbacks.append(CGDCurvature())
    kwargs = dict(dropout=0.3, lr=0.5, curvature_loss=module_cls is CGDTiny)
    main, _ = fit(callbacks, module_cls, **kwargs)
    div = callbacks[0]
    for name in ("max_chaotic", "random"):
        twin_module, _ = div._twins[name]
        perturb = div.epsilon * div.perturbations[name].float()  # the twin's own float32 arithmetic
        separate, _ = fit([CGDCurvature()] if module_cls is CGDTiny else [], module_cls, perturb, **kwargs)
        torch.testing.assert_close(flat(twin_module), flat(separate), rtol=0, atol=1e-6)
        assert div.distances[name][-1] == pytest.approx(
            float((flat(twin_module) - flat(main)).norm()), rel=1e-6
        )
        assert div.distances[name][0] == pytest.approx(div.epsilon, rel=1e-5)


def test_directions_follow_the_exact_spectrum_of_the_first_step():
    div = TrajectoryDivergence(init_samples=0)
    fit([div], max_steps=1, momentum=0.0, lr=0.5)
    module, _ = div._twins["random"]
    pl.seed_everything(0, verbose=False)
    model = TinyModule(momentum=0.0, lr=0.5)
    x, y = next(iter(loader(shuffle=False)))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def flat_loss(vec):
        pieces, i = {}, 0
        for n, s in zip(names, shapes):
            pieces[n] = vec[i : i + s.numel()].reshape(s)
            i += s.numel()
        net_pieces = {k.removeprefix("net."): v for k, v in pieces.items()}
        return nn.functional.cross_entropy(torch.func.functional_call(model.net, net_pieces, (x,)), y)

    evals, evecs = torch.linalg.eigh(torch.func.hessian(flat_loss)(flat(model)).double())
    lle = torch.log((1 - 0.5 * evals).abs())  # plain SGD at γ = 0.5: LLE = log|1 − γh|
    top, bottom = evecs[:, lle.argmax()], evecs[:, lle.argmin()]
    assert abs(float(div.perturbations["max_chaotic"] @ top)) == pytest.approx(1.0, abs=1e-4)
    assert abs(float(div.perturbations["max_non_chaotic"] @ bottom)) == pytest.approx(1.0, abs=1e-4)
    assert div.direction_lle["max_chaotic"] == pytest.approx(float(lle.max()), rel=1e-4)
    chaotic = evecs[:, lle > 1e-6]
    for name, inside in (("chaotic", 1.0), ("non_chaotic", 0.0)):
        u = div.perturbations[name]
        assert float((chaotic.T @ u).norm()) == pytest.approx(inside, abs=1e-3), name
        assert float(u.norm()) == pytest.approx(1.0)


def test_logs_distances_bounds_baselines_and_fits():
    logger = MemoryLogger()
    div = TrajectoryDivergence(directions=["random", "max_chaotic"], init_samples=8)
    fit([div], logger=logger)
    chaos = logger.chaos()
    assert sorted(chaos["chaos/divergence/random"]) == list(range(7))  # d(0) … d(6), d(6) after training
    assert chaos["chaos/divergence/random"][0] == pytest.approx(0.1, rel=1e-5)
    bound = chaos["chaos/divergence/random_walk_bound"]
    assert bound[0] == 0.0 and all(bound[t] < bound[t + 1] for t in range(6))
    steps = div.results["num_steps"]
    assert steps == 6 and div.results["num_params"] == 195
    assert div.results["random_walk_bound"] == pytest.approx(
        random_walk_distance(steps, 195, div.results["sigma"]), rel=1e-12
    )
    assert chaos["chaos/divergence_fit/random_a"][6] == div.results["fit"]["random"][0]
    analytic = chaos["chaos/divergence/init_distance"][0]
    assert analytic == pytest.approx(default_init_distance(TinyModule()))
    assert chaos["chaos/divergence/init_distance_sampled"][0] == pytest.approx(analytic, rel=0.25)


def test_resume_is_exact(tmp_path):
    def run(ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        logger = MemoryLogger()
        div = TrajectoryDivergence(directions=["chaotic", "random"], init_samples=2)
        ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        tr = trainer([div, ckpt], logger=logger, max_steps=-1, max_epochs=2, enable_checkpointing=True)
        # no dropout: Lightning does not checkpoint the global random state, so masks would differ on resume
        tr.fit(TinyModule(batchnorm=True), loader(shuffle=False), ckpt_path=ckpt_path)
        return logger.chaos(), div

    full, full_div = run()
    resumed, resumed_div = run(ckpt_path=tmp_path / "epoch=0.ckpt")
    assert set(resumed["chaos/divergence/random"]) == {4, 5, 6, 7, 8}
    for key, values in resumed.items():
        for step, value in values.items():
            assert full[key][step] == value, (key, step)
    assert full_div.distances == resumed_div.distances and full_div.results == resumed_div.results


class Diverging(TinyModule):
    """Least squares at a huge learning rate: the weights (and the twins') overflow to inf, then NaN."""

    def __init__(self, **kwargs):
        super().__init__(lr=1e4, momentum=0.0)
        self.net = nn.Linear(8, 3)

    def _loss(self, batch):
        x, y = batch
        return (self.net(x) - nn.functional.one_hot(y, 3)).pow(2).mean()


def test_a_diverging_twin_is_dropped_and_training_goes_on():
    div = TrajectoryDivergence(directions=["random"], init_samples=0)
    fit([div], Diverging, max_steps=16)
    assert div.diverged == {"random"} and not math.isfinite(div.distances["random"][-1])
    assert div.results["num_steps"] == 16  # on_train_end ran; the fit uses the finite prefix
    assert all(math.isfinite(v) for v in div.results["fit"].get("random", ()))


def test_unsupported_setups_and_bad_arguments():
    with pytest.raises(MisconfigurationException, match="accumulation"):
        trainer([TrajectoryDivergence()], accumulate_grad_batches=2).fit(TinyModule(), loader())
    with pytest.raises(MisconfigurationException, match="max_exact_params"):
        trainer([TrajectoryDivergence(max_exact_params=10)], max_steps=1).fit(TinyModule(), loader())
    for kwargs, name in [
        ({"epsilon": 0}, "epsilon"),
        ({"directions": ["sideways"]}, "directions"),
        ({"directions": []}, "directions"),
        ({"init_samples": -1}, "init_samples"),
    ]:
        with pytest.raises(MisconfigurationException, match=name):
            TrajectoryDivergence(**kwargs)


class DirectParameter(TinyModule):
    """A parameter held by the LightningModule itself: no submodule's reset_parameters() re-draws it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.scale = nn.Parameter(torch.ones(3))

    def _loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x) * self.scale, y)


class NoRedraw(TinyModule):
    """Only Linear layers (analytic baseline known), one of which cannot be re-drawn."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.net[0].reset_parameters = None


@pytest.mark.parametrize(
    ("module_cls", "analytic"),
    [(DirectParameter, False), (NoRedraw, True)],
    ids=["direct_parameter", "analytic_only"],
)
def test_parameters_no_reset_parameters_redraws_leave_out_the_sampled_baseline(module_cls, analytic):
    logger = MemoryLogger()
    div = TrajectoryDivergence(directions=["random", "max_chaotic"], init_samples=4)
    with pytest.warns(UserWarning, match="no sampled init distance.*cannot re-draw parameter") as caught:
        fit([div], module_cls, logger=logger)
    chaos = logger.chaos()
    assert div.init_distance_sampled is None and "chaos/divergence/init_distance_sampled" not in chaos
    if analytic:  # every trainable parameter belongs to a Linear: the analytic baseline is still reported
        assert div.init_distance == pytest.approx(default_init_distance(TinyModule()), rel=1e-12)
        assert chaos["chaos/divergence/init_distance"] == {0: div.init_distance}
    else:  # the module's own parameter has no known default initialisation either
        assert div.init_distance is None and "chaos/divergence/init_distance" not in chaos
        assert any(
            "no analytic init distance" in str(w.message) and "'scale'" in str(w.message) for w in caught
        )
    # the twins ran anyway
    assert set(div.distances) == {"random", "max_chaotic"} and all(
        len(d) == 7 for d in div.distances.values()
    )
    assert sorted(chaos["chaos/divergence/random"]) == list(range(7))
