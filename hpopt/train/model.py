"""The potential: atom-centred MLPs on scaled fingerprints, summed to an image energy.

E(image) = sum_i ref(Z_i) + n_atoms * (mean + std * mean_i net(x_i)): per-element reference
energies from the training split carry the composition, the network learns the per-atom residual
in scaled units. `singlenn` is one network for all elements (the centre's element is appended as a
one-hot), `bpnn` one network per element (atoms sorted so each element is one contiguous block).

singlenn's one-hot is never materialised: its block of the first weight matrix (plus the bias) is
looked up by element index (`dense.dense_stack`; the same function and parameters as multiplying
the one-hot; on OC20's 55 elements the inputs shrink from 71 to 16 columns). The modules define the
network and its saved state; the forward pass runs their Linear layers and activations as fused
`dense_stack` nodes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from torch import nn

from hpopt.errors import HpoptError
from hpopt.train import fingerprints
from hpopt.train.data import fit_references
from hpopt.train.dense import FUSED_ACTIVATIONS, Layer, LayerSpec, block_columns, chain, dense_stack
from hpopt.train.config import ModelConfig, TrainConfig, parse_config
from hpopt.train.fingerprints import FingerprintSpec, Fingerprints


class Tanh(nn.Module):
    """tanh, on the CPU as 2 sigmoid(2x) - 1 (the same function to float rounding): torch's CPU
    tanh kernel is ~6x slower than its sigmoid. Only runs where `dense_stack` cannot fuse it (after
    batchnorm); other devices use torch.tanh."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cpu:
            return torch.tanh(x)
        return torch.sigmoid(2 * x) * 2 - 1


ACTIVATION_MODULES = {"tanh": Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU,
                      "sigmoid": nn.Sigmoid, "softplus": nn.Softplus, "elu": nn.ELU, "leakyrelu": nn.LeakyReLU}
_FUSED = {Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.ReLU: "relu"}  # activations dense_stack applies itself
_FUSED_MODULES = tuple(_FUSED)
assert set(_FUSED.values()) == set(FUSED_ACTIVATIONS)
DenseChain = list[Layer]  # a network's layers as `dense_stack` runs them


class DenseLinear(nn.Module):
    """A Linear layer whose weight and bias are views of one parameter block (out, cols): weight
    in [:, :n_in], bias in column n_in, zero padding after (`dense.block_columns`). The block is
    what `dense_stack` multiplies and what the optimizer steps."""

    def __init__(self, n_in: int, n_out: int, cols: int) -> None:
        super().__init__()
        self.n_in = n_in
        self.block = nn.Parameter(torch.zeros(n_out, cols))

    @property
    def weight(self) -> torch.Tensor:
        return self.block[:, :self.n_in]

    @property
    def bias(self) -> torch.Tensor:
        return self.block[:, self.n_in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class AtomicNetwork(nn.Module):
    """One MLP per element group; `forward` maps contiguous element blocks to atomic outputs."""

    def __init__(self, n_in: int, n_nets: int, model: ModelConfig, n_classes: int = 0, cpu: bool = True) -> None:
        """n_classes: the last inputs are a one-hot of that many classes, passed as indices. cpu:
        lay the blocks out for the CPU (`dense.block_columns`); any layout runs on any device."""
        super().__init__()
        self.nets = nn.ModuleList(self._mlp(n_in, model, cpu) for _ in range(n_nets))
        self.n_classes = n_classes

    @staticmethod
    def _mlp(n_in: int, model: ModelConfig, cpu: bool) -> nn.Sequential:
        layers: list[nn.Module] = []
        for index, width in enumerate(model.widths):
            layers.append(DenseLinear(n_in, width, n_in + 1 if index == 0 else block_columns(n_in, cpu)))
            if model.batchnorm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(ACTIVATION_MODULES[model.activation]())
            if model.dropout and model.dropout_rate > 0:
                layers.append(nn.Dropout(model.dropout_rate))
            n_in = width
        layers.append(DenseLinear(n_in, 1, block_columns(n_in, cpu) if model.widths else n_in + 1))
        init = nn.init.xavier_uniform_ if model.initialization == "xavier" else nn.init.kaiming_uniform_
        for layer in layers:
            if isinstance(layer, DenseLinear):
                init(layer.weight)  # the bias and the padding stay zero
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, groups: list[tuple[int, int]], classes: torch.Tensor | None = None
                ) -> torch.Tensor:
        """groups: (network index, number of rows) for consecutive blocks of x; classes: the
        one-hot inputs as indices, one per row (when n_classes)."""
        if len(groups) == 1:
            return self._run(self.nets[groups[0][0]], x, classes)
        blocks, start = [], 0
        for net, count in groups:
            if count:
                part = None if classes is None else classes[start:start + count]
                blocks.append(self._run(self.nets[net], x[start:start + count], part))
            start += count
        return torch.cat(blocks)

    def dense_chains(self) -> list[DenseChain] | None:
        """Each network as one `dense_stack` chain, or None when any network holds more than
        Linear layers and fused activations (batchnorm, dropout, gelu...). The trainer's
        autograd-free step runs these directly. The chains hold views of the parameters: build
        them once the parameters' storage is final (after `trainer.flat_parameters`)."""
        chains = []
        for net in self.nets:
            segments = _segments(net)
            if len(segments) > 1:
                return None
            chains.append(chain(segments[0]))
        return chains

    def _run(self, net: nn.Sequential, x: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        """net(x), with each run of fused layers as one `dense_stack` node (see `_segments`); the
        first layer takes singlenn's one-hot as `classes`."""
        hidden = x
        for segment in _segments(net):
            if isinstance(segment, list):
                hidden, classes = dense_stack(hidden, segment, classes), None
            else:
                hidden = segment(hidden)
        return hidden.squeeze(-1)


def _segments(net: nn.Sequential) -> list[list[LayerSpec] | nn.Module]:
    """net's modules in order, each run of Linear layers (each with the activation right after it,
    when that has a fused form) gathered into one list of `LayerSpec`s; other modules (batchnorm,
    dropout, other activations) stand as themselves between runs. Ends with a run (the output
    layer)."""
    modules, segments, run = list(net), [], []
    for k, module in enumerate(modules):
        if isinstance(module, DenseLinear):
            following = modules[k + 1] if k + 1 < len(modules) else None
            run.append((module.block, module.n_in, _FUSED.get(type(following))))
            continue
        if run and run[-1][2] and isinstance(module, _FUSED_MODULES):
            continue  # applied inside the run
        if run:
            segments.append(run)
            run = []
        segments.append(module)
    segments.append(run)
    return segments


@dataclass
class Scalers:
    """Everything fitted on the training split only."""

    feature_mean: torch.Tensor
    feature_std: torch.Tensor
    references: torch.Tensor  # eV per element, 0 for elements unseen in training
    energy_mean: float  # per-atom residual, eV/atom
    energy_std: float

    def to(self, device: torch.device, dtype: torch.dtype) -> "Scalers":
        return Scalers(self.feature_mean.to(device, dtype), self.feature_std.to(device, dtype),
                       self.references.to(device, torch.float64), self.energy_mean, self.energy_std)


def image_index(n_atoms: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(n_atoms.numel(), device=n_atoms.device), n_atoms)


def counts(fps: Fingerprints, n_elements: int) -> torch.Tensor:
    """Composition matrix (n_images, n_elements) from the flat per-atom element indices."""
    out = torch.zeros(fps.n_atoms.numel(), n_elements, dtype=torch.float64, device=fps.element.device)
    out.index_put_((image_index(fps.n_atoms), fps.element), torch.ones_like(fps.element, dtype=torch.float64),
                   accumulate=True)
    return out


@dataclass
class Prepared:
    x: torch.Tensor  # network inputs, rows sorted into element blocks (bpnn) or as given
    classes: torch.Tensor | None  # index inputs in the same row order (singlenn's element)
    groups: list[tuple[int, int]]
    row_image: torch.Tensor  # image index of each row of x
    n_atoms: torch.Tensor
    composition_energy: torch.Tensor  # counts @ references, eV, float64 (fixed while training)


def fit_scalers(train: Fingerprints, n_elements: int) -> Scalers:
    """Feature standardisation, per-element references and residual scale, from training data only."""
    comp = counts(train, n_elements)
    refs = torch.as_tensor(fit_references(comp.cpu().numpy(), train.energy.cpu().numpy()),
                           dtype=torch.float64, device=comp.device)
    per_atom = (train.energy - comp @ refs) / train.n_atoms
    std = float(per_atom.std()) if per_atom.numel() > 1 else 0.0
    feature_std = train.features.std(dim=0) if train.features.shape[0] > 1 else torch.ones_like(train.features[0])
    return Scalers(
        feature_mean=train.features.mean(dim=0),
        feature_std=torch.where(feature_std > 1e-8, feature_std, torch.ones_like(feature_std)),
        references=refs,
        energy_mean=float(per_atom.mean()),
        energy_std=std if std > 1e-8 else 1.0,
    )


class PotentialModel:
    """A trained (or training) potential: config, fingerprint spec, scalers and network."""

    def __init__(self, config: TrainConfig, spec: FingerprintSpec, scalers: Scalers,
                 device: str | torch.device = "cpu", cpu_layout: bool | None = None) -> None:
        """cpu_layout: the parameter blocks' layout (`dense.block_columns`); by default the one for
        `device`. A reloaded model keeps the layout it was trained with, on any device."""
        self.config, self.spec = config, spec
        self.device = torch.device(device)
        self.cpu_layout = self.device.type == "cpu" if cpu_layout is None else cpu_layout
        self.dtype = torch.float64 if config.cmd.dtype == "float64" else torch.float32
        self.scalers = scalers.to(self.device, self.dtype)
        self.per_element = config.model.name == "bpnn"
        n_el = len(spec.elements)
        n_classes = 0 if self.per_element else n_el  # singlenn: the element one-hot
        self.net = AtomicNetwork(spec.n_features + n_classes, n_el if self.per_element else 1, config.model,
                                 n_classes, cpu=self.cpu_layout).to(self.device, self.dtype)
        # batchnorm or dropout: eval mode differs from train mode (switching costs ~60 us a call)
        self.modal = any(isinstance(m, (nn.BatchNorm1d, nn.Dropout)) for m in self.net.modules())

    def inputs(self, fps: Fingerprints) -> torch.Tensor:
        """Scaled fingerprints per atom (singlenn's element one-hot goes in as `fps.element`)."""
        s = self.scalers
        return (fps.features.to(self.device, self.dtype) - s.feature_mean) / s.feature_std

    def classes(self, element: torch.Tensor) -> torch.Tensor | None:
        """The network's index inputs: the element for singlenn, none for bpnn."""
        return None if self.per_element else element

    def groups(self, element: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Row order and blocks for AtomicNetwork.forward (identity, one block, for singlenn)."""
        if not self.per_element:
            return torch.arange(element.numel(), device=element.device), [(0, element.numel())]
        order = torch.argsort(element, stable=True)
        sizes = torch.bincount(element, minlength=len(self.spec.elements)).tolist()
        return order, list(enumerate(sizes))

    def to_energy(self, mean_out: torch.Tensor, n_atoms: torch.Tensor, composition_energy: torch.Tensor
                  ) -> torch.Tensor:
        """Image energies (eV, float64) from the per-image mean of the network's atomic outputs."""
        s = self.scalers
        return (mean_out.double() * s.energy_std + s.energy_mean) * n_atoms + composition_energy

    def prepare(self, fps: Fingerprints) -> "Prepared":
        """Inputs of a fixed set of images in the row order the network needs, on the device."""
        fps = fps.to(self.device)
        order, groups = self.groups(fps.element)
        classes = self.classes(fps.element)
        return Prepared(self.inputs(fps)[order], None if classes is None else classes[order], groups,
                        image_index(fps.n_atoms)[order], fps.n_atoms,
                        counts(fps, len(self.spec.elements)) @ self.scalers.references)

    @torch.inference_mode()
    def energies_of(self, data: "Prepared") -> torch.Tensor:
        """Image energies in eV (float64), network in eval mode."""
        switch = self.modal and self.net.training
        if switch:
            self.net.eval()
        out = self.net(data.x, data.groups, data.classes)
        if switch:
            self.net.train()
        sums = torch.zeros(data.n_atoms.numel(), device=self.device, dtype=self.dtype)
        sums.index_add_(0, data.row_image, out)
        return self.to_energy(sums / data.n_atoms, data.n_atoms, data.composition_energy)

    def energies(self, fps: Fingerprints) -> torch.Tensor:
        return self.energies_of(self.prepare(fps))

    def predict(self, images: list[Atoms]) -> np.ndarray:
        """Energies (eV) of arbitrary structures made of the model's elements."""
        return self.energies(fingerprints.compute(images, self.spec, self.device, self.dtype)).cpu().numpy()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"config": self.config.as_dict(), "spec": asdict(self.spec),
                    "state_dict": self.net.state_dict(), "cpu_layout": self.cpu_layout,
                    "scalers": {k: v.cpu() if isinstance(v, torch.Tensor) else v
                                for k, v in vars(self.scalers).items()}}, path)
        return path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> PotentialModel:
    """Reload a model saved by `PotentialModel.save` (plain tensors and dicts: weights_only)."""
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise HpoptError(f"model file not found: {path}") from None
    except Exception as exc:
        raise HpoptError(f"{path} is not an hpopt model file ({exc})") from None
    if "cpu_layout" not in saved:
        raise HpoptError(f"{path} holds a network this hpopt version cannot read (saved by an older "
                         f"version, before Linear layers became one parameter block): retrain it")
    model = PotentialModel(parse_config(saved["config"]), FingerprintSpec(**saved["spec"]),
                           Scalers(**saved["scalers"]), device, cpu_layout=saved["cpu_layout"])
    try:
        model.net.load_state_dict(saved["state_dict"])
    except RuntimeError as exc:
        raise HpoptError(f"{path} is not an hpopt model file ({exc})") from None
    model.net.eval()
    return model
