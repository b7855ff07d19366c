"""Which trial to trust: lowest validation MAE, weighed against how well it generalises.

The selection rule (also in docs/results.md):

1. Only COMPLETE trials count (pruned and failed trials have no final validation MAE).
2. Candidates are the trials whose validation MAE is within `tolerance` (default 5 %) of the
   lowest one: differences that small are within the noise of one validation split.
3. A trial whose validation MAE is more than `max_gap_ratio` (default 2x) its training MAE is
   flagged "overfit"; flagged candidates are only chosen when every candidate is flagged.
4. Among the remaining candidates the one with the smallest validation/training ratio wins;
   ratios below 1 count as 1 (a model that does better on validation than on training is not
   generalising "more", it is lucky or under-trained), so ties go to the lower validation MAE,
   then the lower trial number.

So the chosen trial is never more than `tolerance` worse on validation than Optuna's own best,
and among near-ties it is the one that memorised its training data least. `tolerance=0` gives
Optuna's plain best trial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpopt.errors import HpoptError
from hpopt.results.snapshot import as_float, gpu_seconds, worker_label

DEFAULT_TOLERANCE = 0.05
DEFAULT_MAX_GAP_RATIO = 2.0


@dataclass(frozen=True)
class Ranked:
    """One complete trial with both errors, as the best/top-k tables show it."""

    number: int
    val_mae: float
    train_mae: float | None
    worker: str
    epochs: int | None
    wall_s: float
    params: dict[str, Any]
    overfit: bool = False

    @property
    def gap(self) -> float | None:
        """Validation minus training MAE (eV); large means the model memorised its data."""
        return None if self.train_mae is None else self.val_mae - self.train_mae

    @property
    def gap_ratio(self) -> float | None:
        """Validation MAE over training MAE (1.0 = no gap)."""
        if self.train_mae is None or self.train_mae <= 0:
            return None
        return self.val_mae / self.train_mae

    def as_dict(self) -> dict[str, Any]:
        return {
            "trial": self.number, "val_mae": self.val_mae, "train_mae": self.train_mae,
            "gap": self.gap, "gap_ratio": self.gap_ratio, "overfit": self.overfit,
            "worker": self.worker, "epochs": self.epochs, "wall_s": self.wall_s,
            "params": self.params,
        }


@dataclass(frozen=True)
class Selection:
    """The chosen trial, every complete trial ranked by validation MAE, and the rule used."""

    best: Ranked
    ranked: list[Ranked]  # ascending validation MAE
    tolerance: float
    max_gap_ratio: float
    n_candidates: int
    counts: dict[str, int] = field(default_factory=dict)  # trials per state

    @property
    def lowest(self) -> Ranked:
        """Optuna's own best trial (lowest validation MAE), for comparison."""
        return self.ranked[0]

    def top(self, k: int) -> list[Ranked]:
        return self.ranked[:k]

    @property
    def rule(self) -> str:
        return (
            f"lowest val/train MAE ratio (floored at 1) among complete trials within "
            f"{self.tolerance:.0%} of the lowest validation MAE, skipping trials with "
            f"val/train > {self.max_gap_ratio:g} unless all candidates exceed it"
        )


def _ranked(trial: FrozenTrial, max_gap_ratio: float) -> Ranked:
    attrs = trial.user_attrs
    epochs = attrs.get("epochs")
    row = Ranked(
        number=trial.number,
        val_mae=float(trial.value),  # type: ignore[arg-type]  # complete trials have a value
        train_mae=as_float(attrs.get("train_mae")),
        worker=worker_label(trial),
        epochs=int(epochs) if isinstance(epochs, (int, float)) else None,
        wall_s=gpu_seconds(trial),
        params=dict(trial.params),
    )
    ratio = row.gap_ratio
    return replace(row, overfit=ratio is not None and ratio > max_gap_ratio)


def _overfit_score(row: Ranked) -> float:
    """val/train ratio, floored at 1: fitting validation better than training is luck, not merit."""
    return math.inf if row.gap_ratio is None else max(row.gap_ratio, 1.0)


def select(
    trials: Iterable[FrozenTrial],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    max_gap_ratio: float = DEFAULT_MAX_GAP_RATIO,
) -> Selection:
    """Apply the selection rule of this module to a study's trials."""
    if tolerance < 0 or max_gap_ratio <= 0:
        raise HpoptError("--tolerance must be >= 0 and --max-gap-ratio > 0")
    trials = list(trials)
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None
                and math.isfinite(t.value)]
    if not complete:
        summary = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "no trials"
        raise HpoptError(f"no complete trial yet ({summary}); check `hpopt status`")
    ranked = sorted((_ranked(t, max_gap_ratio) for t in complete), key=lambda r: (r.val_mae, r.number))
    limit = ranked[0].val_mae * (1 + tolerance) if ranked[0].val_mae > 0 else ranked[0].val_mae
    candidates = [r for r in ranked if r.val_mae <= limit]
    healthy = [r for r in candidates if not r.overfit] or candidates
    best = min(healthy, key=lambda r: (_overfit_score(r), r.val_mae, r.number))
    return Selection(best=best, ranked=ranked, tolerance=tolerance, max_gap_ratio=max_gap_ratio,
                     n_candidates=len(candidates), counts=counts)


def select_from_study(study: optuna.Study, **kwargs: float) -> Selection:
    """`select` on a study, after checking it minimises (trial value = validation MAE)."""
    if study.directions != [optuna.study.StudyDirection.MINIMIZE]:
        raise HpoptError(f"study '{study.study_name}' does not minimise one value; hpopt studies "
                         "minimise validation MAE")
    return select(study.get_trials(deepcopy=False), **kwargs)
