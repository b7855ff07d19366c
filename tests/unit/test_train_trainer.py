"""The native trainer on EMT demo data: it learns, it is reproducible, it stops when told."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hpopt.errors import HpoptError
from hpopt.train.api import Pruned, load_model, retrain_and_test, run_trial
from hpopt.train.config import parse_config
from hpopt.train.data import energies, read_images
from hpopt.train.demo import make_demo
from hpopt.train import dense, fingerprints, trainer
from hpopt.train.model import AtomicNetwork, PotentialModel, fit_scalers
from hpopt.train.split import load_manifest, make_split

FAST = {"dataset": {"cutoff": 4.5, "angular_cutoff": 3.5}, "optim": {"epochs": 40, "lr": 5e-3, "batch_size": 16}}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trainer")
    return make_split(make_demo(root / "demo.traj", n_images=150, seed=0), "demo", out_dir=root / "splits")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _config(**overrides: dict) -> dict:
    return {section: {**FAST.get(section, {}), **overrides.get(section, {})} for section in {*FAST, *overrides}}


def test_training_beats_mean_energy_baseline(manifest: Path, cache: Path) -> None:
    seen: list[tuple[int, float, float]] = []
    result = run_trial(_config(), manifest, cache_dir=cache, on_epoch=lambda *a: seen.append(a))
    m = load_manifest(manifest)
    train_e = energies(read_images(m.source_path, m.train))
    val_e = energies(read_images(m.source_path, m.validation))
    mean_baseline = float(np.mean(np.abs(val_e - train_e.mean())))
    assert result.val_mae < 0.5 * mean_baseline
    assert result.val_mae < result.baseline_val_mae  # also beats the composition fit
    assert [s[0] for s in seen] == list(range(1, 41)) and result.epochs_run == 40
    assert result.val_mae == pytest.approx(min(s[1] for s in seen))  # best epoch restored
    assert result.device == "cpu" and result.val_mae_per_atom < result.val_mae
    assert set(result.as_dict()) >= {"val_mae", "baseline_val_mae_per_atom", "seconds"}


def test_seeded_runs_are_identical_and_seeds_differ(manifest: Path, cache: Path) -> None:
    config = _config(model={"name": "bpnn", "dropout": True, "dropout_rate": 0.1}, optim={"epochs": 3})
    a, b = run_trial(config, manifest, cache_dir=cache), run_trial(config, manifest, cache_dir=cache)
    assert a.val_mae == b.val_mae and a.train_mae == b.train_mae
    c = run_trial(_config(model={"name": "bpnn"}, optim={"epochs": 3}, cmd={"seed": 1}), manifest, cache_dir=cache)
    assert c.val_mae != a.val_mae


def test_callback_exception_stops_the_trial(manifest: Path, cache: Path) -> None:
    def prune(epoch: int, val_mae: float, train_mae: float) -> None:
        if epoch == 2:
            raise Pruned()

    with pytest.raises(Pruned):
        run_trial(_config(), manifest, cache_dir=cache, on_epoch=prune)


def test_early_stopping_and_float64(manifest: Path, cache: Path) -> None:
    config = _config(optim={"lr": 1e-12, "patience": 2, "epochs": 50}, cmd={"dtype": "float64"},
                     model={"batchnorm": True})
    assert run_trial(config, manifest, cache_dir=cache).epochs_run < 50


def test_unknown_key_and_missing_amptorch(manifest: Path) -> None:
    with pytest.raises(HpoptError, match="unknown key 'model.layers'"):
        run_trial({"model": {"layers": 3}}, manifest)


def test_retrain_saves_a_model_that_reloads(manifest: Path, cache: Path, tmp_path: Path) -> None:
    out = retrain_and_test(_config(optim={"epochs": 10}), manifest, tmp_path / "model.pt", cache_dir=cache)
    assert out["test_mae"] > 0 and Path(out["model_path"]).exists()
    model = load_model(out["model_path"])
    m = load_manifest(manifest)
    test_images, train_images = read_images(m.source_path, m.test), read_images(m.source_path, m.train)
    pred = model.predict(test_images)
    assert np.mean(np.abs(pred - energies(test_images))) == pytest.approx(out["test_mae"], rel=1e-4)
    # the reported train MAE is exact (the saved network on every training image), not a running mean
    train_pred = model.predict(train_images)
    assert np.mean(np.abs(train_pred - energies(train_images))) == pytest.approx(out["train_mae"], rel=1e-4)
    saved = torch.load(out["model_path"], weights_only=True)  # the same network as an older version saved it
    saved["state_dict"] = {key.replace(".block", ".weight"): value for key, value in saved["state_dict"].items()}
    del saved["cpu_layout"]
    torch.save(saved, tmp_path / "older.pt")
    with pytest.raises(HpoptError, match="older version.*retrain it"):
        load_model(tmp_path / "older.pt")


def test_schedulers_change_the_learning_rate(manifest: Path, cache: Path) -> None:
    plain: list[tuple[int, float, float]] = []
    stepped: list[tuple[int, float, float]] = []
    run_trial(_config(optim={"epochs": 2}), manifest, cache_dir=cache, on_epoch=lambda *a: plain.append(a))
    step = {"policy": "StepLR", "params": {"step_size": 1, "gamma": 0.0}}  # lr 0 from epoch 2 on
    run_trial(_config(optim={"epochs": 3, "scheduler": step}), manifest, cache_dir=cache,
              on_epoch=lambda *a: stepped.append(a))
    assert plain[0][1] == stepped[0][1] and plain[1][1] != plain[0][1]
    assert stepped[0][1] == stepped[1][1] == stepped[2][1]  # frozen once the rate is 0
    plateau = {"policy": "ReduceLROnPlateau", "params": {"patience": 0, "factor": 0.5}}
    result = run_trial(_config(optim={"epochs": 4, "scheduler": plateau}), manifest, cache_dir=cache)
    assert result.epochs_run == 4 and np.isfinite(result.val_mae)


@pytest.mark.parametrize(("activation", "batchnorm", "dropout"),
                         [("tanh", False, False), ("tanh", True, False), ("tanh", False, True), ("relu", False, True),
                          ("gelu", True, False), ("sigmoid", False, False)])
def test_network_equals_its_modules_with_explicit_one_hot(activation: str, batchnorm: bool, dropout: bool) -> None:
    """AtomicNetwork.forward runs fused dense stacks and takes singlenn's element as an index:
    the same outputs and gradients as feeding the one-hot through the nn.Sequential itself."""
    torch.manual_seed(0)
    model = parse_config({"model": {"num_layers": 3, "num_nodes": 30, "activation": activation, "batchnorm": batchnorm,
                                    "dropout": dropout, "dropout_rate": 0.2}}).model
    net = AtomicNetwork(6 + 4, 1, model, n_classes=4).double().eval()
    x, element = torch.randn(50, 6, dtype=torch.float64), torch.randint(0, 4, (50,))
    got = net(x, [(0, 50)], element)
    want = net.nets[0](torch.cat([x, torch.nn.functional.one_hot(element, 4).double()], dim=1)).squeeze(-1)
    torch.testing.assert_close(got, want)
    params = list(net.parameters())
    for grad_got, grad_want in zip(torch.autograd.grad(got.square().sum(), params),
                                   torch.autograd.grad(want.square().sum(), params)):
        torch.testing.assert_close(grad_got, grad_want)


def _layout_data(n_atoms: list[int], n_elements: int) -> trainer.TrainTensors:
    counts = torch.tensor(n_atoms)
    rows = int(counts.sum())
    return trainer.TrainTensors(x=torch.arange(rows, dtype=torch.float64)[:, None],
                                element=torch.randint(0, n_elements, (rows,),
                                                      generator=torch.Generator().manual_seed(1)),
                                counts=counts, first_atom=torch.cumsum(counts, 0) - counts,
                                n_atoms=counts.double(), target=torch.zeros(len(n_atoms), dtype=torch.float64))


@pytest.mark.parametrize("n_nets", [1, 3])
def test_epoch_layout_puts_each_batch_s_atoms_together(n_nets: int) -> None:
    data = _layout_data([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], n_elements=3)
    image = torch.repeat_interleave(torch.arange(11), data.counts)
    perm, size = torch.randperm(11, generator=torch.Generator().manual_seed(0)), 4
    layout = trainer.epoch_layout(data, perm, size, n_nets)
    assert sorted(layout.order.tolist()) == list(range(int(data.counts.sum())))  # every atom once
    start = 0
    for b, block in enumerate(layout.sizes):
        rows = layout.order[start:start + sum(block)]
        images = perm[b * size:(b + 1) * size]
        assert sorted(rows.tolist()) == sorted(torch.cat([torch.nonzero(image == i)[:, 0] for i in images]).tolist())
        assert torch.equal(images[layout.local_image[start:start + sum(block)]], image[rows])  # local index
        if n_nets > 1:  # each network's block holds its element only
            assert torch.equal(data.element[rows], torch.repeat_interleave(torch.arange(n_nets), torch.tensor(block)))
        start += sum(block)


def test_flat_parameters_are_the_module_s_parameters() -> None:
    torch.manual_seed(0)
    net = AtomicNetwork(5, 2, parse_config({"model": {"num_layers": 2, "num_nodes": 6}}).model)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flat = trainer.flat_parameters(net)
    assert flat.numel() == sum(p.numel() for p in net.parameters())
    torch.testing.assert_close(net.state_dict(), before)  # values kept
    out = net(torch.randn(7, 5), [(0, 3), (1, 4)])
    flat.grad.zero_()
    out.square().sum().backward()
    assert torch.equal(flat.grad, torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    assert flat.grad.abs().sum() > 0
    with torch.no_grad():
        flat.add_(1.0)  # what the optimizer does
    torch.testing.assert_close(net.state_dict(), {k: v + 1 for k, v in before.items()})


def test_bpnn_network_of_an_absent_element_is_not_stepped() -> None:
    """Element 1 occurs in one image only; with batches of one image its network takes exactly
    one optimizer step per epoch (Adam's first step moves each weight by lr), not a momentum step
    on every batch without it."""
    cfg = parse_config({"model": {"name": "bpnn", "num_layers": 1, "num_nodes": 4},
                        "optim": {"batch_size": 1, "lr": 0.01}, "dataset": {"fp_scheme": "weighted"}})
    spec = fingerprints.spec_from_config(cfg.dataset, ["H", "He"])
    gen = torch.Generator().manual_seed(0)
    n_atoms = torch.tensor([3, 2, 4, 3, 2])
    element = torch.zeros(int(n_atoms.sum()), dtype=torch.long)
    element[3] = 1  # one He atom, in image 1
    fps = fingerprints.Fingerprints(torch.randn(int(n_atoms.sum()), spec.n_features, generator=gen), element,
                                    n_atoms, torch.randn(5, generator=gen, dtype=torch.float64))
    torch.manual_seed(0)
    model = PotentialModel(cfg, spec, fit_scalers(fps, 2), "cpu")
    before = [p.detach().clone() for p in model.net.nets[1].parameters()]
    trainer.fit(model, fps, fps, epochs=1, keep_best=False)
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(model.net.nets[1].parameters(), before))
    assert 0.5 * 0.01 < moved <= 0.01 * 1.001


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_optimizer_step_is_torch_s_own_step(optimizer: str) -> None:
    """The direct fused step moves the parameters and the optimizer state exactly as torch's own
    step: with weight decay, a scheduler changing the lr, and a parameter without a gradient on
    some steps (skipped, first seen on the second step)."""
    optim = parse_config({"optim": {"optimizer": optimizer, "lr": 0.01, "weight_decay": 0.1, "scheduler": {
        "policy": "StepLR", "params": {"step_size": 2, "gamma": 0.5}}}}).optim
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(7, generator=gen), torch.randn(3, generator=gen)]
    grads = [(torch.randn(7, generator=gen), torch.randn(3, generator=gen) if k % 3 else None) for k in range(7)]
    runs = []
    for direct in (False, True):
        params = [p.clone() for p in start]
        opt = trainer._optimizer(params, optim)
        scheduler = trainer._scheduler(opt, optim)
        step = trainer.optimizer_step(opt) if direct else opt.step
        assert (step == opt.step) == (optimizer == "sgd" or not direct)
        for batch in grads:
            for param, grad in zip(params, batch):
                param.grad = grad
            step()
            scheduler.step()
        runs.append((params, opt.state_dict()["state"]))
    (torch_params, torch_state), (params, state) = runs
    assert all(torch.equal(a, b) for a, b in zip(torch_params, params))
    assert not torch.equal(params[0], start[0]) and not torch.equal(params[1], start[1])
    torch.testing.assert_close(state, torch_state, rtol=0, atol=0)


def _random_batch(n_classes: int, n_x: int = 6) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(3)
    n_atoms = torch.tensor([5, 3, 7, 1, 4])
    rows = int(n_atoms.sum())
    local_image = torch.repeat_interleave(torch.arange(5), n_atoms)[torch.randperm(rows, generator=gen)]
    return (torch.randn(rows, n_x, dtype=torch.float64, generator=gen),
            torch.randint(0, n_classes, (rows,), generator=gen) if n_classes else None,
            local_image, n_atoms.double(), torch.randn(5, dtype=torch.float64, generator=gen))


@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid"])
@pytest.mark.parametrize("loss", ["mse", "mae"])
@pytest.mark.parametrize("name", ["singlenn", "bpnn"])
@pytest.mark.parametrize("reuse", [False, True])
def test_autograd_free_step_gives_autograd_s_gradients(activation: str, loss: str, name: str, reuse: bool) -> None:
    """batch_gradient (hand-written loss gradient, dense_backward into the parameters' grads)
    against batch_loss + autograd, widths padded (5, 13) and not (8); bpnn with an empty network;
    with `reuse`, through workspaces that already hold a larger batch (strided column views)."""
    torch.manual_seed(0)
    model = parse_config({"model": {"name": name, "hidden_layers": [5, 8, 13], "activation": activation}}).model
    n_nets, n_classes = (3, 0) if name == "bpnn" else (1, 4)
    net = AtomicNetwork(6 + n_classes, n_nets, model, n_classes).double()
    x, classes, local_image, n_atoms, target = _random_batch(n_classes)
    groups = [(0, 12), (1, 0), (2, 8)] if n_nets > 1 else [(0, 20)]
    flat = trainer.flat_parameters(net)
    flat.grad.zero_()
    want_loss, want_err = trainer.batch_loss(net, x, classes, groups, local_image, n_atoms, target, loss)
    want_loss.backward()
    want = flat.grad.clone()
    flat.grad.fill_(float("nan"))  # everything the step reports must be written by it
    chains = net.dense_chains()
    grads = [[layer.block.grad for layer in chain] for chain in chains]
    workspaces = [dense.Workspace(chain) for chain in chains] if reuse else None
    for workspace in workspaces or []:  # a larger batch was here: its values are stale
        for layer, buffer in zip(workspace.layers, workspace.take(40, x)):
            buffer[:layer.block.shape[0]].fill_(float("nan"))
    err = trainer.batch_gradient(chains, grads, x, classes, groups, local_image, n_atoms, target, loss, workspaces)
    torch.testing.assert_close(err, want_err)
    got = flat.grad.split([sum(p.numel() for p in n.parameters()) for n in net.nets])
    for index, (got_net, want_net) in enumerate(zip(got, want.split([g.numel() for g in got]))):
        if index == 1 and n_nets > 1:
            assert got_net.isnan().all()  # no rows: left alone (the optimizer skips it)
        else:
            torch.testing.assert_close(got_net, want_net)
            assert want_net.abs().sum() > 0


def test_dense_chains_only_for_plain_stacks() -> None:
    def chains(**model: object) -> object:
        return AtomicNetwork(4, 1, parse_config({"model": model}).model).dense_chains()

    assert chains(activation="tanh") is not None and chains(activation="relu", dropout=True) is not None  # rate 0
    assert chains(batchnorm=True) is None and chains(activation="gelu") is None
    assert chains(dropout=True, dropout_rate=0.1) is None


@pytest.mark.parametrize("width", [5, 8])
@pytest.mark.parametrize("cpu_layout", [True, False])
def test_dense_stack_gradcheck(width: int, cpu_layout: bool) -> None:
    """Widths padded to a ones row (5 on the CPU layout) and not (8, or the plain layout)."""
    torch.manual_seed(0)
    first = torch.randn(width, 3 + 2 + 1, dtype=torch.float64)  # 3 inputs, 2 classes, the bias
    out = torch.zeros(1, dense.block_columns(width, cpu_layout), dtype=torch.float64)
    out[:, :width + 1] = torch.randn(1, width + 1, dtype=torch.float64)
    blocks = (first.requires_grad_(), out.requires_grad_())
    x = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    classes = torch.randint(0, 2, (9,))
    assert torch.autograd.gradcheck(
        lambda x, *b: dense.dense_stack(x, [(b[0], 5, "tanh"), (b[1], width, None)], classes), (x, *blocks))


def test_autograd_free_training_matches_autograd_training(manifest: Path, cache: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(model={"num_layers": 2, "num_nodes": 10}, optim={"epochs": 5, "loss": "mae"})
    fast = run_trial(config, manifest, cache_dir=cache)
    monkeypatch.setattr(AtomicNetwork, "dense_chains", lambda self: None)
    slow = run_trial(config, manifest, cache_dir=cache)
    assert fast.val_mae == pytest.approx(slow.val_mae, rel=1e-4) and fast.val_mae != slow.baseline_val_mae
    assert fast.train_mae == pytest.approx(slow.train_mae, rel=1e-4)


def _tiny_model_data(model: dict) -> tuple:
    """A small singlenn config (2x6, weighted fingerprints, Cu and O), its fingerprint spec, and
    random fingerprints of 3 images (9 atoms)."""
    cfg = parse_config({"model": {**model, "num_layers": 2, "num_nodes": 6}, "dataset": {"fp_scheme": "weighted"}})
    spec = fingerprints.spec_from_config(cfg.dataset, ["Cu", "O"])
    gen = torch.Generator().manual_seed(0)
    fps = fingerprints.Fingerprints(torch.randn(9, spec.n_features, generator=gen), torch.tensor([0, 1] * 4 + [0]),
                                    torch.tensor([3, 2, 4]), torch.randn(3, generator=gen, dtype=torch.float64))
    return cfg, spec, fps


@pytest.mark.parametrize("model", [{"dropout": True, "dropout_rate": 0.5}, {"batchnorm": True}, {}])
def test_energies_are_in_eval_mode_and_keep_train_mode(model: dict) -> None:
    """Evaluation switches modes only for networks that have them (batchnorm, dropout): the
    same energies as in eval mode, and the network is left training."""
    cfg, spec, fps = _tiny_model_data(model)
    torch.manual_seed(0)
    potential = PotentialModel(cfg, spec, fit_scalers(fps, 2), "cpu")
    assert potential.modal == bool(model)
    potential.net.eval()
    want = potential.energies(fps)
    potential.net.train()
    assert torch.equal(potential.energies(fps), want) and torch.equal(potential.energies(fps), want)
    assert potential.net.training


def test_a_model_keeps_its_block_layout_on_reload(tmp_path: Path) -> None:
    """A network laid out for the GPU (no CPU padding) reloads on the CPU with the same layout and
    the same predictions, and the CPU layout gives the same function as the plain one."""
    cfg, spec, fps = _tiny_model_data({})
    scalers = fit_scalers(fps, 2)
    torch.manual_seed(0)
    plain = PotentialModel(cfg, spec, scalers, "cpu", cpu_layout=False)
    torch.manual_seed(0)
    padded = PotentialModel(cfg, spec, scalers, "cpu")
    assert [p.shape[1] for p in plain.net.parameters()] != [p.shape[1] for p in padded.net.parameters()]
    with torch.no_grad():
        for small, big in zip(plain.net.parameters(), padded.net.parameters()):
            big.zero_()[:, :small.shape[1]] = small
    torch.testing.assert_close(plain.energies(fps), padded.energies(fps))
    reloaded = load_model(plain.save(tmp_path / "plain.pt"))
    assert not reloaded.cpu_layout
    torch.testing.assert_close(reloaded.energies(fps), plain.energies(fps))
