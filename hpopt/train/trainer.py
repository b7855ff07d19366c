"""The native training loop: data stays on the device, batches are index slices, no collation.

Each epoch draws one permutation of the training images and gathers the atoms of all batches in
one go (grouped by batch, and by element for `bpnn`), so a step is a few slices of tensors already
on the device plus the network. `batch_loss` is a function of (network, data tensors) only, so a
later version can stack many same-shape trials along a leading dimension (torch.func) unchanged.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch

from hpopt.train.config import OptimConfig
from hpopt.train.fingerprints import Fingerprints
from hpopt.train.model import AtomicNetwork, PotentialModel, counts, image_index

EpochCallback = Callable[[int, float, float], None]


@dataclass
class FitOutcome:
    epochs_run: int
    best_epoch: int
    train_energy: torch.Tensor  # eV, predictions of the restored best network
    val_energy: torch.Tensor


@dataclass
class TrainTensors:
    """Training images on the device: inputs per atom and scaled per-atom residual targets."""

    x: torch.Tensor
    element: torch.Tensor
    image: torch.Tensor
    n_atoms: torch.Tensor  # float, per image
    target: torch.Tensor  # (residual / n_atoms - mean) / std, per image


def train_tensors(model: PotentialModel, fps: Fingerprints) -> TrainTensors:
    fps = fps.to(model.device)
    s = model.scalers
    per_atom = (fps.energy - counts(fps, len(model.spec.elements)) @ s.references) / fps.n_atoms
    return TrainTensors(model.inputs(fps), fps.element, image_index(fps.n_atoms), fps.n_atoms.to(model.dtype),
                        ((per_atom - s.energy_mean) / s.energy_std).to(model.dtype))


def batch_loss(net: AtomicNetwork, x: torch.Tensor, classes: torch.Tensor | None, groups: list[tuple[int, int]],
               local_image: torch.Tensor, n_atoms: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Loss of one batch: atomic outputs summed per image (index_add), averaged per atom."""
    sums = torch.zeros_like(target).index_add_(0, local_image, net(x, groups, classes))
    err = sums / n_atoms - target
    return (err * err).mean() if loss == "mse" else err.abs().mean()


def _optimizer(params: list[torch.nn.Parameter], optim: OptimConfig) -> torch.optim.Optimizer:
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optim.optimizer]
    # fused: one kernel for all parameters; small models are otherwise dominated by the step
    return cls(params, lr=optim.lr, weight_decay=optim.weight_decay, fused=True)


def _scheduler(opt: torch.optim.Optimizer, optim: OptimConfig) -> torch.optim.lr_scheduler.LRScheduler | None:
    if not optim.scheduler:
        return None
    cls = getattr(torch.optim.lr_scheduler, optim.scheduler["policy"])
    return cls(opt, **optim.scheduler.get("params", {}))


def fit(model: PotentialModel, train: Fingerprints, val: Fingerprints, *, epochs: int,
        on_epoch: EpochCallback | None = None, keep_best: bool = True) -> FitOutcome:
    """Train `model.net` in place; with `keep_best`, restore the epoch with the lowest validation MAE.

    `on_epoch(epoch, val_mae, train_mae)` (eV) runs after every epoch; whatever it raises (e.g.
    optuna.TrialPruned) propagates. Early stopping after `optim.patience` epochs without progress.
    Without `keep_best` (validation is part of the training data) the last epoch is kept.
    """
    optim = model.config.optim
    data = train_tensors(model, train)
    evaluation = model.prepare(Fingerprints.cat([train, val]))
    n_train = train.n_atoms.numel()
    true_energy = torch.cat([train.energy, val.energy]).to(model.device)
    opt = _optimizer(list(model.net.parameters()), optim)
    scheduler = _scheduler(opt, optim)
    generator = torch.Generator().manual_seed(model.config.cmd.seed)
    n_el = len(model.spec.elements) if model.per_element else 1
    n_images, size = data.n_atoms.numel(), optim.batch_size
    n_batches = math.ceil(n_images / size)

    best = (math.inf, 0, copy.deepcopy(model.net.state_dict()))
    epoch = 0
    for epoch in range(1, epochs + 1):
        model.net.train()
        perm = torch.randperm(n_images, generator=generator).to(model.device)
        rank = torch.empty_like(perm)
        rank[perm] = torch.arange(n_images, device=model.device)
        atom_batch = (rank // size)[data.image]
        key = atom_batch * n_el + data.element if n_el > 1 else atom_batch
        order = torch.argsort(key, stable=True)
        sizes = torch.bincount(key, minlength=n_batches * n_el).view(n_batches, n_el).tolist()
        x, local = data.x[order], (rank % size)[data.image[order]]
        classes = model.classes(data.element[order])
        target, n_atoms = data.target[perm], data.n_atoms[perm]
        start = 0
        for b, block in enumerate(sizes):
            stop = start + sum(block)
            loss = batch_loss(model.net, x[start:stop], None if classes is None else classes[start:stop],
                              list(enumerate(block)), local[start:stop],
                              n_atoms[b * size:(b + 1) * size], target[b * size:(b + 1) * size], optim.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            start = stop

        energy = model.energies_of(evaluation)
        err = (energy - true_energy).abs()
        train_mae, val_mae = float(err[:n_train].mean()), float(err[n_train:].mean())
        if scheduler is not None:
            scheduler.step(val_mae) if optim.scheduler["policy"] == "ReduceLROnPlateau" else scheduler.step()
        if val_mae < best[0]:
            best = (val_mae, epoch, copy.deepcopy(model.net.state_dict()) if keep_best else None)
        if on_epoch is not None:
            on_epoch(epoch, val_mae, train_mae)
        if keep_best and optim.patience and epoch - best[1] >= optim.patience:
            break

    if keep_best:
        model.net.load_state_dict(best[2])
    energy = model.energies_of(evaluation)
    return FitOutcome(epochs_run=epoch, best_epoch=best[1], train_energy=energy[:n_train], val_energy=energy[n_train:])
