"""Native trainer vs straightforward reference implementations, on the OC20 sample.

Run: `python benchmarks/bench_train.py` from the repository root (about 2 minutes). Reads
../shared/data/oc20_300_a.traj when present (never copied into the repository), else falls back
to EMT demo data. Prints, in one run and side by side:
* fingerprints: ms/image and s per 1,000 images for the batched native path and for a
  straightforward per-image implementation written below (ASE neighbour list, one pair list and
  one triplet index list per image; the stand-in for amptorch, whose GMP is not installable here),
  their agreement, and amptorch's GMP figure measured upstream on this data for context;
* training: ms/epoch for the native loop and a per-batch-collating loop (amptorch's data path:
  per-image tensors collated in Python each batch, the element one-hot as explicit inputs), both
  with explicit train and validation MAE every epoch, their validation MAE and peak memory;
* the linear-composition baseline beside a tuned-ish model.
Times are CPU seconds of this process on one thread (time.process_time): the machine is shared,
so CPU time is the stable figure; wall-clock time is printed beside it.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from ase import Atoms
from ase.neighborlist import neighbor_list

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hpopt.train import amptorch_backend, fingerprints, trainer  # noqa: E402
from hpopt.train.api import split_fingerprints, resolve_device, run_trial  # noqa: E402
from hpopt.train.config import parse_config  # noqa: E402
from hpopt.train.demo import make_demo  # noqa: E402
from hpopt.train.data import read_images  # noqa: E402
from hpopt.train.model import PotentialModel, fit_scalers  # noqa: E402
from hpopt.train.split import load_manifest, make_split  # noqa: E402

OC20 = REPO.parent / "shared" / "data" / "oc20_300_a.traj"
EPOCHS = 30
REFERENCE_IMAGES = 40  # the per-image reference is slow; timed on the first images only
AMPTORCH_GMP_MS = (7.6, 8.5)  # ms/image, amptorch GMP on this data and machine type (issue 7)
AMPTORCH_EPOCH_MS = {(3, 20): 27.0, (5, 30): 38.0}  # ms/epoch, amptorch CPU float64 batch 32 (issue 7)


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def timed(fn: Callable[[], object]) -> tuple[object, float, float]:
    """(result, CPU seconds, wall seconds)."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def per_image_reference(images: list[Atoms], spec: fingerprints.FingerprintSpec) -> torch.Tensor:
    """The straightforward implementation: per image, ASE's neighbour list, G2 by index_add, and
    an explicit (centre, j, k) triplet list built from the pair list, float64."""
    column = {e: k for k, e in enumerate(spec.elements)}
    z_of = {e: float(fingerprints.atomic_numbers[e]) for e in spec.elements}
    rc4 = spec.angular_cutoff or spec.cutoff
    fc = lambda r, rc: torch.where(r < rc, 0.5 * (torch.cos(math.pi * r / rc) + 1), torch.zeros_like(r))  # noqa: E731
    out = []
    for atoms in images:
        n = len(atoms)
        i, j, d = (torch.as_tensor(a) for a in neighbor_list("ijD", atoms, spec.cutoff))
        symbols = atoms.get_chemical_symbols()
        elem = torch.tensor([column[s] for s in symbols])
        z = torch.tensor([z_of[s] for s in symbols], dtype=torch.float64)
        r = d.norm(dim=1)
        etas, rs = torch.tensor(spec.g2_etas), torch.tensor(spec.g2_rs)
        g2 = (torch.exp(-etas[:, None] * (r[:, None, None] - rs) ** 2) * fc(r, spec.cutoff)[:, None, None]).flatten(1)
        near = r < rc4
        i4, j4, d4, r4 = i[near], j[near], d[near], r[near]
        counts = torch.bincount(i4, minlength=n)
        first, counts = (torch.cumsum(counts, 0) - counts).tolist(), counts.tolist()
        p, q = [], []
        for c in range(n):  # all neighbour pairs (p < q) of each centre
            idx = torch.triu_indices(counts[c], counts[c], 1) + first[c]
            p.append(idx[0])
            q.append(idx[1])
        p, q = torch.cat(p), torch.cat(q)
        cos = (d4[p] * d4[q]).sum(1) / (r4[p] * r4[q])
        r_jk = (d4[q] - d4[p]).norm(dim=1)
        base = torch.exp(-torch.tensor(spec.g4_etas)[:, None] * (r4[p] ** 2 + r4[q] ** 2 + r_jk ** 2))
        base = base * (fc(r4[p], rc4) * fc(r4[q], rc4) * fc(r_jk, rc4))
        angle = torch.stack([2 ** (1 - zeta) * (1 + gamma * cos) ** zeta
                             for zeta in spec.g4_zetas for gamma in spec.g4_gammas])
        g4 = (base[:, None, :] * angle[None, :, :]).flatten(0, 1).T
        if spec.scheme == "weighted":
            radial = torch.zeros(n, 2 * g2.shape[1], dtype=torch.float64).index_add_(
                0, i, torch.cat([g2, g2 * z[j][:, None]], 1))
            ww = (z[j4[p]] * z[j4[q]])[:, None]
            angular = torch.zeros(n, 2 * g4.shape[1], dtype=torch.float64).index_add_(
                0, i4[p], torch.cat([g4, g4 * ww], 1))
        else:
            n_el = len(spec.elements)
            radial = torch.zeros(n * n_el, g2.shape[1], dtype=torch.float64).index_add_(
                0, i * n_el + elem[j], g2).view(n, -1)
            lo, hi = torch.triu_indices(n_el, n_el)
            pair = torch.zeros(n_el, n_el, dtype=torch.long)
            pair[lo, hi] = pair[hi, lo] = torch.arange(lo.numel())
            channel = pair[elem[j4[p]], elem[j4[q]]]
            angular = torch.zeros(n * lo.numel(), g4.shape[1], dtype=torch.float64).index_add_(
                0, i4[p] * lo.numel() + channel, g4).view(n, -1)
        out.append(torch.cat([radial, angular], 1))
    return torch.cat(out)


def collating_loop(model: PotentialModel, train: fingerprints.Fingerprints, val: fingerprints.Fingerprints,
                   epochs: int) -> tuple[float, float, float]:
    """The stand-in: per-image tensors (features with the element one-hot appended), a shuffled
    index list, and each batch collated in Python (torch.cat of per-image pieces, like
    torch_geometric's Batch.from_data_list), then the same MLP parameters, loss and a plain Adam.
    Returns (CPU seconds per epoch, wall seconds per epoch, best validation MAE)."""
    mlp = model.net.nets[0]  # the same parameters, fed the explicit one-hot
    n_el = len(model.spec.elements)

    def per_image(fps: fingerprints.Fingerprints, target: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        onehot = torch.nn.functional.one_hot(fps.element, n_el).to(model.dtype)
        x = torch.cat([model.inputs(fps), onehot], dim=1)
        bounds = [0, *torch.cumsum(fps.n_atoms, 0).tolist()]
        return [(x[a:b], fps.n_atoms[k:k + 1].to(model.dtype), target[k:k + 1]) for k, (a, b) in
                enumerate(zip(bounds[:-1], bounds[1:]))]

    s = model.scalers
    per_atom = lambda fps: ((fps.energy - trainer.counts(fps, n_el) @ s.references)  # noqa: E731
                            / fps.n_atoms - s.energy_mean) / s.energy_std
    train_items, val_items = per_image(train, per_atom(train).to(model.dtype)), per_image(val, per_atom(val))
    opt = torch.optim.Adam(model.net.parameters(), lr=model.config.optim.lr)  # plain, as amptorch's skorch
    rng, size, best = np.random.default_rng(0), model.config.optim.batch_size, math.inf

    def collate(items: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        x = torch.cat([it[0] for it in items])
        index = torch.cat([torch.full((len(it[0]),), k) for k, it in enumerate(items)])
        return x, index, torch.cat([it[1] for it in items]), torch.cat([it[2] for it in items])

    def image_means(x: torch.Tensor, index: torch.Tensor, n_atoms: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(n_atoms), dtype=model.dtype).index_add_(0, index, mlp(x).squeeze(-1)) / n_atoms

    def evaluate(items: list[tuple[torch.Tensor, ...]]) -> float:
        errors = []
        for b in range(0, len(items), size):
            x, index, n_atoms, target = collate(items[b:b + size])
            errors.append(((image_means(x, index, n_atoms) - target).abs() * s.energy_std * n_atoms).double())
        return float(torch.cat(errors).mean())

    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(epochs):
        model.net.train()
        order = rng.permutation(len(train_items))
        for b in range(0, len(order), size):
            x, index, n_atoms, target = collate([train_items[k] for k in order[b:b + size]])
            loss = (image_means(x, index, n_atoms) - target).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.net.eval()
        with torch.no_grad():  # explicit train and validation MAE every epoch, as the native loop reports
            val_mae, _ = (evaluate(items) for items in (val_items, train_items))
        best = min(best, val_mae)
    return (time.process_time() - cpu) / epochs, (time.perf_counter() - wall) / epochs, best


def config(layers: int, nodes: int) -> dict:
    return {"model": {"name": "singlenn", "num_layers": layers, "num_nodes": nodes},
            "optim": {"batch_size": 32, "lr": 3e-3, "epochs": EPOCHS}, "cmd": {"seed": 0}}


def bench_fingerprints(atoms: list[Atoms], spec: fingerprints.FingerprintSpec,
                       short: fingerprints.FingerprintSpec) -> None:
    n_atoms = np.mean([len(a) for a in atoms])
    print(f"\nfingerprints: {spec.scheme} scheme, {spec.n_features} features per atom "
          f"(G2 etas {list(spec.g2_etas)}, G4 etas {list(spec.g4_etas)} zetas {list(spec.g4_zetas)} "
          f"gammas {list(spec.g4_gammas)}), cutoff {spec.cutoff} A for G2 and G4, "
          f"{len(atoms)} images of {n_atoms:.0f} atoms on average, float32 (reference float64):")
    fingerprints.features(atoms[:8], spec, "cpu", torch.float32)  # warm-up
    reset_peak()
    ours, cpu, wall = timed(lambda: fingerprints.features(atoms, spec, "cpu", torch.float32))
    rss = peak_rss_mb()
    subset = atoms[:REFERENCE_IMAGES]
    ref, ref_cpu, ref_wall = timed(lambda: per_image_reference(subset, spec))
    check = fingerprints.features(subset, spec, "cpu", torch.float64)
    gap = float(((check - ref).abs() / (ref.abs() + 1e-6)).max())
    ms, ref_ms = cpu / len(atoms) * 1e3, ref_cpu / len(subset) * 1e3
    print(f"  native, batched:       {ms:6.2f} ms/image CPU ({wall / len(atoms) * 1e3:.2f} wall) = "
          f"{ms:.2f} s per 1,000 images, peak RSS {rss:.0f} MB")
    print(f"  per-image reference:   {ref_ms:6.2f} ms/image CPU ({ref_wall / len(subset) * 1e3:.2f} wall; first "
          f"{len(subset)} images) -> RATIO {ref_ms / ms:.1f}x; max relative difference {gap:.1e}")
    low, high = AMPTORCH_GMP_MS
    print(f"  amptorch GMP, measured upstream on this data: {low}-{high} ms/image -> RATIO "
          f"{low / ms:.1f}-{high / ms:.1f}x (target 10x)")
    _, cpu, wall = timed(lambda: fingerprints.features(atoms, short, "cpu", torch.float32))
    print(f"  native, angular_cutoff {short.angular_cutoff} A: {cpu / len(atoms) * 1e3:.2f} ms/image CPU "
          f"({wall / len(atoms) * 1e3:.2f} wall) -> {low / (cpu / len(atoms) * 1e3):.1f}-"
          f"{high / (cpu / len(atoms) * 1e3):.1f}x amptorch")


def bench_epochs(cfg_dict: dict, manifest_path: Path, cache: Path) -> None:
    cfg = parse_config(cfg_dict)
    manifest = load_manifest(manifest_path)
    spec = fingerprints.spec_from_config(cfg.dataset, manifest.elements)
    device = resolve_device(None, cfg)
    train = split_fingerprints(manifest, "train", spec, cache, device, torch.float32)
    val = split_fingerprints(manifest, "validation", spec, cache, device, torch.float32)
    warm = PotentialModel(cfg, spec, fit_scalers(train, len(spec.elements)), device)
    trainer.fit(warm, train, val, epochs=1)  # one-time costs (lazy imports, allocator) out of the timing
    collating_loop(warm, train, val, 1)
    results = {}
    for name in ("native", "collating"):
        torch.manual_seed(0)
        model = PotentialModel(cfg, spec, fit_scalers(train, len(spec.elements)), device)
        reset_peak()
        if name == "native":
            outcome, cpu, wall = timed(lambda: trainer.fit(model, train, val, epochs=EPOCHS))
            mae = float((outcome.val_energy - val.energy).abs().mean())
            results[name] = (cpu / EPOCHS, wall / EPOCHS, mae, peak_rss_mb())
        else:
            results[name] = (*collating_loop(model, train, val, EPOCHS), peak_rss_mb())
    layers, nodes = cfg.model.num_layers, cfg.model.num_nodes
    print(f"\ntraining singlenn {layers}x{nodes}, batch 32, {EPOCHS} epochs, Adam lr 3e-3, CPU float32, one thread "
          f"(every epoch ends with explicit train and validation MAE):")
    for name, (cpu, wall, mae, rss) in results.items():
        print(f"  {name:10s} {cpu * 1e3:6.1f} ms/epoch CPU ({wall * 1e3:5.1f} wall)   best val MAE {mae:7.3f} eV"
              f"   peak RSS {rss:.0f} MB")
    native, collating = results["native"], results["collating"]
    print(f"  RATIO collating / native: {collating[0] / native[0]:.1f}x CPU, {collating[1] / native[1]:.1f}x wall, "
          f"val MAE within {abs(collating[2] / native[2] - 1):.0%}")
    upstream = AMPTORCH_EPOCH_MS.get((layers, nodes))
    if upstream:
        print(f"  amptorch, measured upstream (CPU, float64, batch 32): {upstream:.0f} ms/epoch -> RATIO "
              f"{upstream / (native[0] * 1e3):.1f}x (target 3x)")


def main() -> None:
    torch.set_num_threads(1)  # one core each: stable figures on a shared 2-core machine
    tmp = Path(tempfile.mkdtemp(prefix="hpopt-bench-"))
    if OC20.exists():
        source, label = OC20, "OC20 sample (300 frames, 55 elements)"
    else:
        print(f"skip: {OC20} not found; falling back to EMT demo data")
        source, label = make_demo(tmp / "demo.traj", n_images=300, seed=0), "EMT demo (300 images)"
    manifest_path = make_split(source, "bench", out_dir=tmp / "splits", seed=0)
    manifest = load_manifest(manifest_path)
    print(f"data: {label}; {len(manifest.train)} train / {len(manifest.validation)} validation images")
    if amptorch_backend.available():
        print("amptorch is importable: compare with `trainer: amptorch` through run_trial as well")

    dataset = parse_config({}).dataset
    spec = fingerprints.spec_from_config(dataset, manifest.elements)
    dataset.angular_cutoff = 4.0
    short = fingerprints.spec_from_config(dataset, manifest.elements)
    bench_fingerprints(read_images(manifest.source_path, manifest.train + manifest.validation), spec, short)

    cache = tmp / "cache"
    for layers, nodes in ((3, 20), (5, 30)):
        bench_epochs(config(layers, nodes), manifest_path, cache)

    tuned = {"model": {"name": "singlenn", "hidden_layers": [64, 64], "activation": "silu"},
             "optim": {"batch_size": 16, "lr": 2e-3, "epochs": 150, "patience": 40, "weight_decay": 1e-5}}
    result = run_trial(tuned, manifest_path, cache_dir=cache)
    verdict = "beats" if result.val_mae < result.baseline_val_mae else "does NOT beat"
    print(f"\ntuned-ish model {tuned['model']} ({result.epochs_run} epochs, {result.seconds:.1f} s):")
    print(f"  linear composition baseline val MAE: {result.baseline_val_mae:.2f} eV "
          f"({result.baseline_val_mae_per_atom:.3f} eV/atom)")
    print(f"  model val MAE:                       {result.val_mae:.2f} eV "
          f"({result.val_mae_per_atom:.3f} eV/atom) -> {verdict} the baseline")


if __name__ == "__main__":
    main()
