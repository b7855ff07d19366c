"""The native training loop: data stays on the device, batches are index slices, no collation.

Each epoch draws one permutation of the training images and gathers the atoms of all batches in
one go (grouped by batch, and by element for `bpnn`), so a step is a few slices of tensors already
on the device plus the network. `batch_loss` is a function of (network, data tensors) only, so a
later version can stack many same-shape trials along a leading dimension (torch.func) unchanged.

Per epoch the loop evaluates only the validation split (exact, eval mode: pruning and keep-best
need it); the train MAE it reports per epoch is the running MAE of the epoch's own batches (train
mode, weights changing within the epoch). Exact train and validation predictions of the restored
best network come once, at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from hpopt.train.config import OptimConfig
from hpopt.train.fingerprints import Fingerprints
from hpopt.train.dense import Workspace, dense_backward, dense_forward
from hpopt.train.model import AtomicNetwork, DenseChain, PotentialModel, counts

EpochCallback = Callable[[int, float, float], None]


@dataclass
class FitOutcome:
    epochs_run: int
    best_epoch: int
    train_energy: torch.Tensor  # eV, exact predictions of the restored best network (eval mode)
    val_energy: torch.Tensor


@dataclass
class TrainTensors:
    """Training images on the device: inputs per atom and scaled per-atom residual targets."""

    x: torch.Tensor
    element: torch.Tensor
    counts: torch.Tensor  # atoms per image (integer)
    first_atom: torch.Tensor  # row of each image's first atom in x
    n_atoms: torch.Tensor  # atoms per image, in the model's dtype
    target: torch.Tensor  # (residual / n_atoms - mean) / std, per image


def train_tensors(model: PotentialModel, fps: Fingerprints) -> TrainTensors:
    fps = fps.to(model.device)
    s = model.scalers
    per_atom = (fps.energy - counts(fps, len(model.spec.elements)) @ s.references) / fps.n_atoms
    return TrainTensors(model.inputs(fps), fps.element, fps.n_atoms, torch.cumsum(fps.n_atoms, 0) - fps.n_atoms,
                        fps.n_atoms.to(model.dtype), ((per_atom - s.energy_mean) / s.energy_std).to(model.dtype))


@dataclass
class EpochLayout:
    """Where this epoch's batches are: `order` gathers the training atoms so that each batch (and,
    for `bpnn`, each element within it) is one contiguous block of rows."""

    order: torch.Tensor  # row -> atom
    local_image: torch.Tensor  # row -> index of its image within its batch
    sizes: list[list[int]]  # rows per (batch, network)


def epoch_layout(data: TrainTensors, perm: torch.Tensor, batch_size: int, n_nets: int) -> EpochLayout:
    """Images in `perm` order, their atoms block by block (repeat_interleave, no sort); with several
    networks one stable sort per epoch groups each batch's atoms by element."""
    n_rows, n_images = data.x.shape[0], perm.numel()
    atoms = data.counts.index_select(0, perm)
    first_row = torch.cumsum(atoms, 0) - atoms
    order = torch.repeat_interleave(data.first_atom.index_select(0, perm) - first_row, atoms, output_size=n_rows)
    order += torch.arange(n_rows, device=order.device)
    slot = torch.arange(n_images, device=perm.device)  # per image; per row, int64 % and // would cost 2x
    local = torch.repeat_interleave(slot % batch_size, atoms, output_size=n_rows)
    key = torch.repeat_interleave(slot // batch_size, atoms, output_size=n_rows)
    if n_nets > 1:
        key = key * n_nets + data.element.index_select(0, order)
        regroup = torch.argsort(key, stable=True)
        order, local, key = order[regroup], local[regroup], key[regroup]
    n_batches = math.ceil(n_images / batch_size)
    sizes = torch.bincount(key, minlength=n_batches * n_nets).view(n_batches, n_nets).tolist()
    return EpochLayout(order, local, sizes)


def batch_loss(net: AtomicNetwork, x: torch.Tensor, classes: torch.Tensor | None, groups: list[tuple[int, int]],
               local_image: torch.Tensor, n_atoms: torch.Tensor, target: torch.Tensor, loss: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of one batch: atomic outputs summed per image (index_add), averaged per atom. Also
    returns the per-image errors (scaled per-atom units, detached) for the running train MAE."""
    per_atom = torch.zeros_like(target).index_add_(0, local_image, net(x, groups, classes)) / n_atoms
    loss_fn = torch.nn.functional.mse_loss if loss == "mse" else torch.nn.functional.l1_loss
    return loss_fn(per_atom, target), per_atom.detach() - target


@torch.no_grad()
def batch_gradient(chains: list[DenseChain], grads: list[list[torch.Tensor]], x: torch.Tensor,
                   classes: torch.Tensor | None, groups: list[tuple[int, int]], local_image: torch.Tensor,
                   n_atoms: torch.Tensor, target: torch.Tensor, loss: str,
                   workspaces: list[Workspace] | None = None) -> torch.Tensor:
    """`batch_loss` and its backward pass without autograd, for networks that are plain dense
    chains (`AtomicNetwork.dense_chains`): `dense_forward` per network block, the loss gradient by
    hand, `dense_backward` straight into `grads` (per network, shaped like its chain's parameters;
    a network without rows is not written). Same gradients as autograd to float rounding, without
    its graph and per-node bookkeeping (~0.5 ms a batch); `workspaces` (one per network) keep the
    layer outputs from batch to batch. Returns the per-image errors."""
    blocks, start = [], 0
    for net, count in groups:
        if count:
            rows = slice(start, start + count)
            x_block, part = x[rows], None if classes is None else classes[rows]
            stored = dense_forward(x_block, part, chains[net], workspaces[net] if workspaces else None)
            blocks.append((net, rows, x_block, part, stored))
        start += count
    values = [stored[-1][0] for *_, stored in blocks]
    per_atom = torch.zeros_like(target).index_add_(0, local_image, values[0] if len(values) == 1 else torch.cat(values))
    err = per_atom.div_(n_atoms).sub_(target)
    # d loss / d per_atom as torch's mse_loss / l1_loss backward computes it, then through the division and the sums
    slope, scale = (err, 2 / err.numel()) if loss == "mse" else (err.sgn(), 1 / err.numel())
    d_rows = torch.addcdiv(slope.new_zeros(()), slope, n_atoms, value=scale).index_select(0, local_image)[None, :]
    for net, rows, x_block, part, stored in blocks:
        dense_backward(d_rows[:, rows], x_block, part, chains[net], stored, into=grads[net])
    return err


def flat_parameters(net: torch.nn.Module) -> torch.Tensor:
    """Turn every parameter of `net`, and its gradient, into a view of one buffer; returns that
    buffer with `.grad` set. The optimizer then updates a few flat tensors (one fused kernel, not
    a dozen launches and their Python), and zeroing all gradients is one fill; backward
    accumulates into the views in place. The module keeps working as before (state_dict,
    load_state_dict)."""
    params = list(net.parameters())
    sizes = [p.numel() for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    flat.grad = torch.zeros_like(flat)
    for param, value, grad in zip(params, flat.split(sizes), flat.grad.split(sizes)):
        param.data = value.view_as(param)
        param.grad = grad.view_as(param)
    return flat


def _optimizer(params: list[torch.Tensor], optim: OptimConfig) -> torch.optim.Optimizer:
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optim.optimizer]
    return cls(params, lr=optim.lr, weight_decay=optim.weight_decay, fused=True)


def optimizer_step(opt: torch.optim.Optimizer) -> Callable[[], None]:
    """`opt.step`, or for fused Adam / AdamW a step that calls torch's fused kernel directly:
    `Optimizer.step` spends ~35-50 us of Python per call (hooks, grouping by device and dtype), a
    tenth of a small network's whole step. Same update (the kernel torch's own fused step runs,
    on the optimizer's own state, at its group's current lr, which schedulers change);
    parameters without a gradient are skipped as torch skips them. torch's step runs while some
    parameter with a gradient has no state yet (the first step; a bpnn network's first batch)."""
    group = opt.param_groups[0]
    if not isinstance(opt, torch.optim.Adam) or len(opt.param_groups) > 1 or not group["fused"] \
            or group["amsgrad"] or group["maximize"] or group["capturable"] or group["differentiable"]:
        return opt.step
    kernel = torch._fused_adamw_ if group.get("decoupled_weight_decay") else torch._fused_adam_  # no such key in older torch

    def step() -> None:
        params = [p for p in group["params"] if p.grad is not None]
        states = [opt.state.get(p) for p in params]
        if not params or not all(states):
            opt.step()
            return
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, 1)
        beta1, beta2 = group["betas"]
        kernel(params, [p.grad for p in params], [state["exp_avg"] for state in states],
               [state["exp_avg_sq"] for state in states], [], steps, amsgrad=False, lr=group["lr"], beta1=beta1,
               beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

    return step


def _scheduler(opt: torch.optim.Optimizer, optim: OptimConfig) -> torch.optim.lr_scheduler.LRScheduler | None:
    if not optim.scheduler:
        return None
    cls = getattr(torch.optim.lr_scheduler, optim.scheduler["policy"])
    return cls(opt, **optim.scheduler.get("params", {}))


def fit(model: PotentialModel, train: Fingerprints, val: Fingerprints, *, epochs: int,
        on_epoch: EpochCallback | None = None, keep_best: bool = True) -> FitOutcome:
    """Train `model.net` in place; with `keep_best`, restore the epoch with the lowest validation MAE.

    `on_epoch(epoch, val_mae, train_mae)` (eV) runs after every epoch: `val_mae` is exact (eval
    mode, after the epoch), `train_mae` the running MAE of the epoch's batches as they were
    trained on (train mode). Whatever it raises (e.g. optuna.TrialPruned) propagates. Early
    stopping after `optim.patience` epochs without progress. Without `keep_best` (validation is
    part of the training data) the last epoch is kept. The outcome holds exact predictions.
    """
    optim = model.config.optim
    data = train_tensors(model, train)
    val_inputs = model.prepare(val)
    val_energy = val.energy.to(model.device)
    flat = flat_parameters(model.net)
    # one optimizer tensor per network: a bpnn batch without some element leaves that network's
    # gradient None, so the optimizer skips it (no momentum step, no step count), as per parameter
    per_net = [sum(p.numel() for p in net.parameters()) for net in model.net.nets]
    net_params, net_grads = flat.split(per_net), flat.grad.split(per_net)
    opt = _optimizer(list(net_params), optim)
    step = optimizer_step(opt)
    scheduler = _scheduler(opt, optim)
    generator = torch.Generator().manual_seed(model.config.cmd.seed)
    n_nets = len(model.net.nets)
    chains = model.net.dense_chains()  # None: batchnorm, dropout or another activation, autograd steps
    chain_grads = [[layer.block.grad for layer in chain] for chain in chains or []]
    workspaces = [Workspace(chain) for chain in chains or []]
    n_images, size = data.n_atoms.numel(), optim.batch_size
    # the best epoch's parameters and buffers (batchnorm statistics), copied in place on improvement
    live = [flat, *model.net.buffers()]
    best_state = [t.clone() for t in live] if keep_best else []
    best_mae, best_epoch, epoch = math.inf, 0, 0
    for epoch in range(1, epochs + 1):
        model.net.train()
        perm = torch.randperm(n_images, generator=generator).to(model.device)
        layout = epoch_layout(data, perm, size, n_nets)
        rows = [sum(block) for block in layout.sizes]
        classes = model.classes(data.element.index_select(0, layout.order))
        n_atoms = data.n_atoms.index_select(0, perm)
        batches = zip(layout.sizes, data.x.index_select(0, layout.order).split(rows), layout.local_image.split(rows),
                      [None] * len(rows) if classes is None else classes.split(rows),
                      n_atoms.split(size), data.target.index_select(0, perm).split(size))
        errors = []
        for block, x, local, part, batch_n_atoms, target in batches:
            if chains is None:
                loss, err = batch_loss(model.net, x, part, list(enumerate(block)), local, batch_n_atoms, target,
                                       optim.loss)
                flat.grad.zero_()
                loss.backward()
            else:
                err = batch_gradient(chains, chain_grads, x, part, list(enumerate(block)), local, batch_n_atoms,
                                     target, optim.loss, workspaces)
            for param, grad, net_rows in zip(net_params, net_grads, block):
                param.grad = grad if net_rows else None
            step()
            errors.append(err)
        train_mae = float((torch.cat(errors).abs() * n_atoms).mean()) * model.scalers.energy_std
        val_mae = float((model.energies_of(val_inputs) - val_energy).abs().mean())
        if scheduler is not None:
            scheduler.step(val_mae) if optim.scheduler["policy"] == "ReduceLROnPlateau" else scheduler.step()
        if val_mae < best_mae:
            best_mae, best_epoch = val_mae, epoch
            for saved, now in zip(best_state, live):
                saved.copy_(now)
        if on_epoch is not None:
            on_epoch(epoch, val_mae, train_mae)
        if keep_best and optim.patience and epoch - best_epoch >= optim.patience:
            break

    for saved, now in zip(best_state, live):
        now.copy_(saved)
    return FitOutcome(epochs_run=epoch, best_epoch=best_epoch, train_energy=model.energies(train),
                      val_energy=model.energies_of(val_inputs))
