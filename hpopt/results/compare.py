"""`hpopt compare`: the same search budget under different samplers/pruners, side by side.

The fair axis for "which search strategy is better" is the device time spent, not the trial
count: a pruner makes trials cheaper, so it buys more of them. For each study we order finished
trials (complete, pruned, failed) by completion time, add up their GPU seconds (the worker's
"wall_s"), and follow the best validation MAE found so far. The summary also gives the GPU
time each study needed to reach a common target: the worst of the studies' final bests, i.e. a
level every study reached.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import optuna
from optuna.trial import TrialState

from hpopt.errors import HpoptError
from hpopt.results.figures import FigureSpec, require_plotting
from hpopt.results.report import Section, csv_text, html_table, render_page, write_figure, write_text_atomic
from hpopt.results.snapshot import gpu_seconds

if TYPE_CHECKING:
    import plotly.graph_objects as go
    from matplotlib.figure import Figure as MplFigure

METHOD = ("GPU time is the sum of the finished trials' wall_s in completion order (pruned and "
          "failed trials cost time too); gpu_h_to_target is the GPU time each study needed to "
          "reach target_val_mae, the worst of the studies' final bests (a level all reached).")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass(frozen=True)
class Curve:
    """One study's best-so-far validation MAE against cumulative GPU hours."""

    study: str
    sampler: str
    pruner: str
    gpu_h: list[float]  # cumulative, one entry per finished trial
    best: list[float | None]  # best complete value so far at that point (None before the first)
    counts: dict[str, int]

    @property
    def total_gpu_h(self) -> float:
        return self.gpu_h[-1] if self.gpu_h else 0.0

    @property
    def final_best(self) -> float | None:
        return self.best[-1] if self.best else None

    def gpu_h_to_reach(self, target: float) -> float | None:
        """GPU hours spent when the best value first got to `target` or below."""
        return next((h for h, b in zip(self.gpu_h, self.best) if b is not None and b <= target), None)


def study_curve(study: optuna.Study) -> Curve:
    trials = [t for t in study.get_trials(deepcopy=False, states=FINISHED) if t.datetime_complete]
    trials.sort(key=lambda t: (t.datetime_complete, t.number))
    gpu_h: list[float] = []
    best: list[float | None] = []
    spent, current = 0.0, None
    for t in trials:
        spent += gpu_seconds(t) / 3600.0
        if t.state == TrialState.COMPLETE and t.value is not None:
            current = t.value if current is None else min(current, t.value)
        gpu_h.append(spent)
        best.append(current)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    attrs = study.user_attrs
    return Curve(study.study_name, str(attrs.get("sampler", "?")), str(attrs.get("pruner", "?")),
                 gpu_h, best, counts)


def common_target(curves: Sequence[Curve]) -> float | None:
    """A validation MAE every study reached: the worst of their final bests."""
    finals = [c.final_best for c in curves]
    return None if any(f is None for f in finals) else max(f for f in finals if f is not None)


def _label(c: Curve) -> str:
    return f"{c.study} ({c.sampler}/{c.pruner})"


def _points(c: Curve) -> tuple[list[float], list[float]]:
    pairs = [(h, b) for h, b in zip(c.gpu_h, c.best) if b is not None]
    return [h for h, _ in pairs], [b for _, b in pairs]


def _plotly(curves: Sequence[Curve]) -> "go.Figure":
    import plotly.graph_objects as go

    fig = go.Figure()
    for c in curves:
        x, y = _points(c)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=_label(c), line={"shape": "hv"}))
    fig.update_layout(title="Best validation MAE so far vs GPU time",
                      xaxis_title="GPU time spent (hours, sum of trial wall_s)",
                      yaxis_title="best validation MAE so far (eV)")
    return fig


def _mpl(curves: Sequence[Curve]) -> "MplFigure":
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for c in curves:
        x, y = _points(c)
        ax.step(x, y, where="post", marker="o", markersize=3, label=_label(c))
    ax.set_xlabel("GPU time spent (hours, sum of trial wall_s)")
    ax.set_ylabel("best validation MAE so far (eV)")
    ax.set_title("Best validation MAE so far vs GPU time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def summary_rows(curves: Sequence[Curve]) -> list[dict[str, object]]:
    """One row per study for the CLI table and compare.csv."""
    target = common_target(curves)
    return [{
        "study": c.study, "sampler": c.sampler, "pruner": c.pruner,
        "finished": len(c.gpu_h), "complete": c.counts.get("COMPLETE", 0),
        "pruned": c.counts.get("PRUNED", 0), "failed": c.counts.get("FAIL", 0),
        "gpu_h": c.total_gpu_h, "best_val_mae": c.final_best, "target_val_mae": target,
        "gpu_h_to_target": c.gpu_h_to_reach(target) if target is not None else None,
    } for c in curves]


def write_comparison(studies: Sequence[optuna.Study], out_dir: Path) -> tuple[list[Path], list[dict[str, object]]]:
    """compare.html (self-contained), figures/compare.{html,png} and compare.csv in out_dir;
    returns the files and the summary rows."""
    require_plotting()
    if len(studies) < 2:
        raise HpoptError("compare needs at least two studies")
    curves = [study_curve(s) for s in studies]
    empty = [c.study for c in curves if not c.gpu_h]
    if empty:
        raise HpoptError(f"no finished trial yet in {', '.join(empty)}; nothing to compare")
    out_dir = Path(out_dir)
    spec = FigureSpec("compare", "Best validation MAE so far vs GPU time",
                      "Each step is a finished trial; the x axis adds up the GPU time of all "
                      "finished trials (pruned and failed ones cost time too).",
                      lambda: _plotly(curves), lambda: _mpl(curves))
    div, files = write_figure(spec, out_dir / "figures")
    rows = summary_rows(curves)
    csv_path = out_dir / "compare.csv"
    write_text_atomic(csv_path, csv_text(list(rows[0]), rows))
    table = html_table(list(rows[0]), [list(r.values()) for r in rows])
    sections = [
        Section("Summary", table + f'<p class="caption">{html.escape(METHOD)}</p>', anchor="summary"),
        Section(spec.title, f'<p class="caption">{html.escape(spec.caption)}</p>{div}', anchor="figure"),
    ]
    page = out_dir / "compare.html"
    write_text_atomic(page, render_page("Study comparison: " + " vs ".join(c.study for c in curves),
                                        "best-so-far validation MAE against GPU time", sections))
    return [page, csv_path, *files], rows
