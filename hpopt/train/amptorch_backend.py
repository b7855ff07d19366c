"""`trainer: amptorch`: the same trial config trained by upstream amptorch's `AtomsTrainer`.

amptorch (GPL-3.0, github.com/ulissigroup/amptorch) is imported, never vendored, and only when
this backend is chosen. Upstream HEAD 02e5af3 on torch 2.x / skorch 1.x / numpy 2 needs runtime
fixes, all applied here (idempotent class patches; process state restored after each trial):

* skorch renamed `CVSplit` to `ValidSplit`: aliased before every `import amptorch`, the one in
  `available()` included (without it the import fails on skorch >= 0.12);
* skorch calls `on_batch_end(net, batch=(Xi, yi), ...)`: amptorch's MemEffEpochScoring wants `y`;
* numpy >= 1.24 refuses to `np.concatenate` amptorch's ragged `[[energy, None]]` targets (skorch's
  EpochScoring does): its target extractor is wrapped to return an object table instead;
* process-wide side effects are undone after every trial: the default dtype (amptorch sets
  float64), the working directory (it `chdir`s into run_dir, which must be absolute), skorch's
  `net.to_tensor` (it swaps in its own), cudnn's deterministic/benchmark flags and the global
  random/numpy/torch RNG states (it seeds them), its checkpoints and ./processed fingerprints
  (a temp dir, deleted), its prints and tqdm bars (silenced), and its mutation of the config
  dict (it gets a fresh dict).

On this path torch >= 2.6's `weights_only=True` needs no fix: only skorch loads (a state dict);
amptorch's pickled config.pt / normalizers.pt are read by `load_pretrained`, which is not used.

The trial is scored by explicit predictions on the validation images after every epoch, never
from amptorch's `history`; their fingerprints are built once per trial (`Predictor`), not by
`AtomsTrainer.predict` on every call. The returned predictions are of the checkpoint amptorch reloads at the
end of training, the epoch with the best epoch-averaged training MAE (not validation).
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import tempfile
from typing import Any, Callable, Iterator

import numpy as np
import torch
from ase import Atoms

from hpopt.errors import HpoptError
from hpopt.train.config import TrainConfig

ACTIVATIONS = {"tanh": "Tanh", "relu": "ReLU", "gelu": "GELU", "silu": "SiLU", "sigmoid": "Sigmoid",
               "softplus": "Softplus", "elu": "ELU", "leakyrelu": "LeakyReLU"}
OPTIMIZERS = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}


def available() -> bool:
    """Whether amptorch imports; its `from skorch.dataset import CVSplit` needs the alias first."""
    try:
        _alias_cv_split()
        import amptorch  # noqa: F401
    except ImportError:
        return False
    return True


def amptorch_config(cfg: TrainConfig, images: list[Atoms], run_dir: str, device: str) -> dict[str, Any]:
    """The AtomsTrainer config for a trial (energies only, no internal validation split)."""
    if cfg.model.initialization != "xavier":
        raise HpoptError("trainer amptorch supports model.initialization: xavier only")
    if cfg.dataset.fp_scheme == "weighted" or cfg.dataset.angular_cutoff not in (0.0, cfg.dataset.cutoff):
        raise HpoptError("trainer amptorch supports fp_scheme gaussian/auto with one cutoff only")
    m, o = cfg.model, cfg.optim
    elements = sorted({s for atoms in images for s in atoms.get_chemical_symbols()})
    # amptorch reads the angular set under the name of its function: "G4" or "G5" (same definitions).
    fp_params = {("G5" if group == "G4" and cfg.dataset.angular == "g5" else group): values
                 for group, values in cfg.dataset.fp_params.items()}
    return {
        "model": {"name": m.name, "get_forces": False, "num_layers": len(m.widths), "num_nodes": m.widths[0],
                  "hidden_layers": m.widths, "activation": getattr(torch.nn, ACTIVATIONS[m.activation]),
                  "batchnorm": m.batchnorm, "dropout": m.dropout, "dropout_rate": m.dropout_rate,
                  "initialization": m.initialization},
        "optim": {"gpus": 1 if device.startswith("cuda") else 0, "force_coefficient": 0.0, "lr": o.lr,
                  "batch_size": o.batch_size, "epochs": o.epochs, "loss": o.loss, "metric": "mae",
                  "optimizer": getattr(torch.optim, OPTIMIZERS[o.optimizer]),
                  "optimizer_args": {"optimizer__weight_decay": o.weight_decay},
                  **({"scheduler": o.scheduler} if o.scheduler else {})},
        "dataset": {"raw_data": images, "val_split": 0, "elements": elements, "fp_scheme": "gaussian",
                    "fp_params": {"default": {**fp_params, "cutoff": cfg.dataset.cutoff}},
                    "save_fps": False, "scaling": {"type": "normalize", "range": (0, 1)}},
        "cmd": {"debug": False, "run_dir": run_dir, "seed": cfg.cmd.seed, "identifier": "trial",
                "verbose": False, "logger": False,
                "dtype": torch.DoubleTensor if cfg.cmd.dtype == "float64" else torch.FloatTensor},
    }


def _alias_cv_split() -> None:
    """skorch >= 0.12 renamed CVSplit to ValidSplit; amptorch imports the old name at import time."""
    import skorch.dataset

    if not hasattr(skorch.dataset, "CVSplit"):
        skorch.dataset.CVSplit = skorch.dataset.ValidSplit


def patch_upstream() -> None:
    """Idempotent compatibility fixes to amptorch's classes, applied once it has imported."""
    import amptorch.metrics
    from amptorch.metrics import MemEffEpochScoring

    if not getattr(amptorch.metrics.target_extractor, "_hpopt", False):
        ragged = amptorch.metrics.target_extractor

        def target_extractor(y: Any) -> np.ndarray:
            """Rows of [energy, forces-or-None] as an object table: skorch `np.concatenate`s them."""
            rows = ragged(y)
            table = np.empty((len(rows), 2), dtype=object)
            for index, (energy, forces) in enumerate(rows):
                table[index, 0], table[index, 1] = energy, forces
            return table

        target_extractor._hpopt = True  # type: ignore[attr-defined]
        amptorch.metrics.target_extractor = target_extractor  # evaluator() reads this global

    if not getattr(MemEffEpochScoring.on_batch_end, "_hpopt", False):
        original = MemEffEpochScoring.on_batch_end

        def on_batch_end(self: Any, net: Any, batch: Any = None, y: Any = None, y_pred: Any = None,
                         training: bool = False, **kwargs: Any) -> Any:
            if y is None and batch is not None:
                y = batch[1]
            return original(self, net, y=y, y_pred=y_pred, training=training, **kwargs)

        on_batch_end._hpopt = True  # type: ignore[attr-defined]
        MemEffEpochScoring.on_batch_end = on_batch_end


@contextlib.contextmanager
def contained() -> Iterator[str]:
    """An absolute temp run_dir; the process state amptorch changes is restored afterwards."""
    import skorch.net

    cwd, dtype, to_tensor = os.getcwd(), torch.get_default_dtype(), skorch.net.to_tensor
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    rng = random.getstate(), np.random.get_state()
    with tempfile.TemporaryDirectory(prefix="hpopt-amptorch-") as run_dir, torch.random.fork_rng():
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield run_dir
        finally:
            torch.set_default_dtype(dtype)
            os.chdir(cwd)
            skorch.net.to_tensor = to_tensor
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
            random.setstate(rng[0])
            np.random.set_state(rng[1])


class Predictor:
    """Energies of a fixed set of images from a loaded AtomsTrainer's current network, without
    fingerprinting them again. `AtomsTrainer.predict` rebuilds its images' fingerprints on every
    call (~2.7 s per epoch for 200 EMT images, so per-epoch scoring cost far more than training);
    here they are built once, exactly as `predict` builds them (its descriptor, then the trained
    feature scaler), collated into batches, and each call only runs the network in eval mode."""

    CHUNK = 256  # images per collated batch

    def __init__(self, trainer: Any, images: list[Atoms]) -> None:
        from amptorch.dataset import DataCollater, construct_descriptor
        from amptorch.preprocessing import AtomsToData

        to_data = AtomsToData(descriptor=construct_descriptor(trainer.config["dataset"]["descriptor"]),
                              r_energy=False, r_forces=False, save_fps=False, fprimes=trainer.forcetraining, cores=1)
        data = to_data.convert_all(images, disable_tqdm=True)
        trainer.feature_scaler.norm(data, disable_tqdm=True)
        collate = DataCollater(train=False, forcetraining=trainer.forcetraining)
        self.trainer = trainer
        self.batches = [collate(data[start:start + self.CHUNK]).to(trainer.device)
                        for start in range(0, len(data), self.CHUNK)]

    def energies(self) -> np.ndarray:
        module = self.trainer.net.module
        was_training = module.training
        module.eval()
        with torch.no_grad():
            energy = torch.cat([module([batch])[0].detach().cpu() for batch in self.batches])
        module.train(was_training)
        return np.asarray(self.trainer.target_scaler.denorm(energy, pred="energy"), dtype=float).reshape(-1)


def train_and_predict(cfg: TrainConfig, train_images: list[Atoms], val_images: list[Atoms], *,
                      on_epoch: Callable[[int, float, float], None] | None, device: str
                      ) -> tuple[np.ndarray, np.ndarray, int]:
    """Train with AtomsTrainer; return (train predictions, validation predictions, epochs run)."""
    if not available():
        raise HpoptError("trainer amptorch needs amptorch importable (pip install "
                         "git+https://github.com/ulissigroup/amptorch); use trainer: native")
    patch_upstream()
    import skorch.callbacks
    from amptorch.trainer import AtomsTrainer

    train_true = np.array([a.get_potential_energy() for a in train_images])
    val_true = np.array([a.get_potential_energy() for a in val_images])
    epochs = [0]

    class Report(skorch.callbacks.Callback):  # explicit predictions, never amptorch's history
        def on_epoch_end(self, net: Any, **kwargs: Any) -> None:
            epochs[0] += 1
            if on_epoch is not None:
                val_mae = float(np.mean(np.abs(val_predictor.energies() - val_true)))
                train_mae = float(np.mean(np.abs(train_predictor.energies() - train_true)))
                on_epoch(epochs[0], val_mae, train_mae)

    with contained() as run_dir:
        trainer = AtomsTrainer(amptorch_config(cfg, list(train_images), run_dir, device))
        trainer.load()  # upstream ignores cmd.custom_callback: add ours, then train as pretrained
        train_predictor, val_predictor = Predictor(trainer, train_images), Predictor(trainer, val_images)
        trainer.net.callbacks.append(Report())
        trainer.pretrained = True
        trainer.train()
        return train_predictor.energies(), val_predictor.energies(), epochs[0]
