"""The figures of a report, each drawn twice: plotly for the HTML pages, matplotlib for the PNGs.

Both renderers work offline and headless (plotly's JS is inlined or copied beside the page,
matplotlib uses the Agg backend), which is what a login node or a batch job offers. Kaleido
would need a browser for PNGs; matplotlib does not. A figure that cannot be drawn yet (too few
trials, nothing reported per epoch) says why instead of failing the whole report.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpopt.results.snapshot import worker_label

if TYPE_CHECKING:
    import plotly.graph_objects as go
    from matplotlib.figure import Figure as MplFigure

VAL_LABEL = "validation MAE (eV)"
PLOTS_HINT = "pip install 'hpopt[plots]'"


@dataclass(frozen=True)
class FigureSpec:
    """One figure: where it goes, what it shows, and how to draw it in each renderer."""

    name: str  # file stem: figures/<name>.html and figures/<name>.png
    title: str
    caption: str
    plotly: Callable[[], "go.Figure"]
    matplotlib: Callable[[], "MplFigure"]
    skip_reason: str | None = None  # set when the study cannot support this figure yet


def require_plotting() -> None:
    """Fail early, in one line, when the plotting libraries are missing."""
    from hpopt.errors import HpoptError

    missing = [m for m in ("plotly", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        raise HpoptError(f"{' and '.join(missing)} not installed: {PLOTS_HINT}")


def mpl_figure(drawn: Any) -> "MplFigure":
    """The matplotlib Figure behind what Optuna's matplotlib functions return (Axes or array)."""
    import numpy as np

    axes = drawn.flat[0] if isinstance(drawn, np.ndarray) else drawn
    return axes.figure


def _optuna_mpl(func: Callable[..., Any], *args: Any, **kwargs: Any) -> "MplFigure":
    import matplotlib

    matplotlib.use("Agg")
    with warnings.catch_warnings():  # optuna marks its matplotlib backend experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return mpl_figure(func(*args, **kwargs))


def elapsed_unit(seconds: float) -> tuple[float, str]:
    """Divisor and label for a time axis: minutes for short spans, hours for long ones."""
    return (60.0, "minutes") if seconds < 2 * 3600 else (3600.0, "hours")


@dataclass(frozen=True)
class _Point:
    worker: str
    t_s: float  # seconds since the first trial started
    value: float
    number: int
    pruned: bool


def _wallclock_points(trials: list[FrozenTrial]) -> list[_Point]:
    """Finished trials placed at their completion time; pruned ones at their last reported MAE."""
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    if not starts:
        return []
    t0: datetime = min(starts)
    points = []
    for t in trials:
        if t.datetime_complete is None:
            continue
        if t.state == TrialState.COMPLETE and t.value is not None:
            value, pruned = t.value, False
        elif t.state == TrialState.PRUNED and t.intermediate_values:
            value, pruned = t.intermediate_values[max(t.intermediate_values)], True
        else:
            continue
        points.append(_Point(worker_label(t), (t.datetime_complete - t0).total_seconds(),
                             float(value), t.number, pruned))
    return sorted(points, key=lambda p: p.t_s)


def best_so_far(xs: list[float], values: list[float]) -> tuple[list[float], list[float]]:
    """The running minimum of values, as a step curve over xs (already sorted)."""
    out_x: list[float] = []
    out_y: list[float] = []
    best = float("inf")
    for x, v in zip(xs, values):
        if v < best:
            best = v
            out_x.append(x)
            out_y.append(v)
    if out_x and xs and xs[-1] > out_x[-1]:
        out_x.append(xs[-1])
        out_y.append(best)
    return out_x, out_y


def _wallclock_plotly(points: list[_Point]) -> "go.Figure":
    import plotly.graph_objects as go

    span = max((p.t_s for p in points), default=0.0)
    div, unit = elapsed_unit(span)
    fig = go.Figure()
    for worker in sorted({p.worker for p in points}):
        mine = [p for p in points if p.worker == worker]
        for pruned in (False, True):
            sel = [p for p in mine if p.pruned == pruned]
            if sel:
                fig.add_trace(go.Scatter(
                    x=[p.t_s / div for p in sel], y=[p.value for p in sel], mode="markers",
                    name=f"{worker}{' (pruned)' if pruned else ''}", legendgroup=worker,
                    marker={"symbol": "x" if pruned else "circle", "size": 8},
                    text=[f"trial {p.number}" for p in sel],
                ))
    done = [p for p in points if not p.pruned]
    bx, by = best_so_far([p.t_s / div for p in done], [p.value for p in done])
    fig.add_trace(go.Scatter(x=bx, y=by, mode="lines", name="best so far",
                             line={"shape": "hv", "color": "black"}))
    fig.update_layout(title="Validation MAE vs wall-clock time, per worker",
                      xaxis_title=f"wall-clock time since the first trial ({unit})",
                      yaxis_title=VAL_LABEL, legend_title="worker")
    return fig


def _wallclock_mpl(points: list[_Point]) -> "MplFigure":
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    span = max((p.t_s for p in points), default=0.0)
    div, unit = elapsed_unit(span)
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    workers = sorted({p.worker for p in points})
    colors = matplotlib.colormaps["tab10" if len(workers) <= 10 else "tab20"]
    for i, worker in enumerate(workers):
        for pruned in (False, True):
            sel = [p for p in points if p.worker == worker and p.pruned == pruned]
            if sel:
                ax.scatter([p.t_s / div for p in sel], [p.value for p in sel],
                           marker="x" if pruned else "o", color=colors(i % colors.N),
                           label=None if pruned else worker, alpha=0.8)
    done = [p for p in points if not p.pruned]
    bx, by = best_so_far([p.t_s / div for p in done], [p.value for p in done])
    ax.step(bx, by, where="post", color="black", label="best so far")
    ax.set_xlabel(f"wall-clock time since the first trial ({unit}); x = pruned")
    ax.set_ylabel(VAL_LABEL)
    ax.set_title("Validation MAE vs wall-clock time, per worker")
    if len(workers) <= 12:
        ax.legend(fontsize="small", title="worker")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _curves_mpl(trials: list[FrozenTrial]) -> "MplFigure":
    """Learning curves coloured by outcome (Optuna's version puts every trial in the legend)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    styles = {TrialState.COMPLETE: ("tab:blue", "complete"), TrialState.PRUNED: ("tab:red", "pruned")}
    labelled: set[TrialState] = set()
    for t in trials:
        if not t.intermediate_values:
            continue
        color, label = styles.get(t.state, ("tab:gray", t.state.name.lower()))
        steps = sorted(t.intermediate_values)
        values = [t.intermediate_values[s] for s in steps]
        ax.plot(steps, values, color=color, alpha=0.6, linewidth=1,
                label=None if t.state in labelled else label)
        labelled.add(t.state)
        if t.state == TrialState.PRUNED:
            ax.plot(steps[-1:], values[-1:], "x", color=color)
    ax.set_xlabel("epoch")
    ax.set_ylabel(VAL_LABEL)
    ax.set_yscale("log")
    ax.set_title("Learning curves (x = pruned here)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _importances_plotly(importances: dict[str, float]) -> "go.Figure":
    import plotly.graph_objects as go

    names = list(importances)[::-1]  # most important on top
    fig = go.Figure(go.Bar(x=[importances[n] for n in names], y=names, orientation="h",
                           text=[f"{importances[n]:.2f}" for n in names], textposition="outside"))
    fig.update_layout(title="Hyperparameter importances (fANOVA)",
                      xaxis_title=f"share of the variance of the {VAL_LABEL}", yaxis_title="")
    return fig


def _importances_mpl(importances: dict[str, float]) -> "MplFigure":
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    names = list(importances)[::-1]
    fig = Figure(figsize=(8, 1.5 + 0.4 * len(names)))
    ax = fig.subplots()
    bars = ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", padding=2)
    ax.set_xlabel(f"share of the variance of the {VAL_LABEL}")
    ax.set_title("Hyperparameter importances (fANOVA)")
    ax.set_xlim(0, max(list(importances.values()) + [1e-9]) * 1.15)
    fig.tight_layout()
    return fig


def _importance_skip(complete: list[FrozenTrial]) -> str | None:
    if importlib.util.find_spec("sklearn") is None:
        return f"fANOVA needs scikit-learn ({PLOTS_HINT})"
    if len(complete) < 2:
        return f"needs at least 2 complete trials (has {len(complete)})"
    if not any(t.params for t in complete):
        return "the trials have no parameters"
    return None


def study_figures(study: optuna.Study) -> list[FigureSpec]:
    """Every figure of a study report, in the order the index shows them."""
    import optuna.visualization as pv
    import optuna.visualization.matplotlib as pm

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    none_complete = None if complete else "no complete trial yet"
    importances = functools.cache(lambda: optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)))  # slow: compute once
    points = _wallclock_points(trials)
    return [
        FigureSpec(
            "optimization_history", "Optimisation history",
            "Validation MAE of each complete trial in trial order, with the best value so far.",
            lambda: pv.plot_optimization_history(study, target_name=VAL_LABEL),
            lambda: _optuna_mpl(pm.plot_optimization_history, study, target_name=VAL_LABEL),
            none_complete,
        ),
        FigureSpec(
            "param_importances", "Parameter importances (fANOVA)",
            "How much of the variance in validation MAE each hyperparameter explains "
            "(fANOVA on a random forest fitted to the complete trials, seed 0).",
            lambda: _importances_plotly(importances()),
            lambda: _importances_mpl(importances()),
            _importance_skip(complete),
        ),
        FigureSpec(
            "parallel_coordinate", "Parallel coordinates",
            "Each line is a complete trial through its hyperparameter values, coloured by "
            "validation MAE.",
            lambda: pv.plot_parallel_coordinate(study, target_name=VAL_LABEL),
            lambda: _optuna_mpl(pm.plot_parallel_coordinate, study, target_name=VAL_LABEL),
            none_complete,
        ),
        FigureSpec(
            "slice", "Slice plots",
            "Validation MAE against each hyperparameter on its own (colour: trial number).",
            lambda: pv.plot_slice(study, target_name=VAL_LABEL),
            lambda: _optuna_mpl(pm.plot_slice, study, target_name=VAL_LABEL),
            none_complete,
        ),
        FigureSpec(
            "intermediate_values", "Learning curves (pruning)",
            "Validation MAE reported after each epoch; curves that stop early were pruned.",
            lambda: pv.plot_intermediate_values(study),
            lambda: _curves_mpl(trials),
            None if any(t.intermediate_values for t in trials) else "no trial reported per-epoch values yet",
        ),
        FigureSpec(
            "wallclock_by_worker", "Validation MAE vs wall-clock time, per worker",
            "Each point is a finished trial at the time it finished, coloured by the worker "
            "(Slurm job) that ran it; crosses are pruned trials at their last reported MAE. "
            "The black line is the best value found so far across all workers.",
            lambda: _wallclock_plotly(points),
            lambda: _wallclock_mpl(points),
            None if points else "no finished trial yet",
        ),
    ]
