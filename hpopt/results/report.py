"""`hpopt report`: a directory a researcher can open, share and cite from.

Layout of OUT (default `reports/<study>/`):

    index.html          one self-contained page (plotly JS inlined once): summary, best trial,
                        top-N table, every figure interactive; works offline, e.g. after scp
    best_params.json    the selected trial (rule in hpopt/results/best.py) and its parameters
    all_trials.csv      one row per trial: params, state, values, durations, worker, epochs
    top_N.csv           the N lowest validation MAEs with their train/validation gap
    figures/NAME.html   each figure on its own page; they share figures/plotly.min.js (offline)
    figures/NAME.png    each figure as a static image (matplotlib) for slides and papers

Every file is written to a temporary name and renamed, so a crash never leaves half a report.
"""

from __future__ import annotations

import csv
import html
import io
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import optuna
from optuna.trial import FrozenTrial
from rich.progress import Progress

from hpopt.errors import HpoptError
from hpopt.rundir import write_json_atomic
from hpopt.results.best import Selection, select_from_study
from hpopt.results.figures import FigureSpec, require_plotting, study_figures
from hpopt.results.snapshot import as_float, duration_s, gpu_seconds, worker_label

ATTR_COLUMNS = ["train_mae", "val_mae_per_atom", "train_mae_per_atom", "baseline_val_mae",
                "worker_job_id", "array_index", "host", "gpu", "device"]
TRIAL_COLUMNS = ["number", "state", "val_mae", "last_reported_val_mae", "gap", "worker", "epochs",
                 "wall_s", "duration_s", "datetime_start", "datetime_complete", *ATTR_COLUMNS]


def write_text_atomic(path: Path, text: str) -> None:
    """Write a report file so readers never see half of it (temp file + rename, mode 0644)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def csv_text(header: Sequence[str], rows: Iterable[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(header), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(timezone.utc).isoformat() if value is not None else None


def trial_row(trial: FrozenTrial) -> dict[str, Any]:
    """One trial as a flat CSV row (params prefixed `param_`)."""
    attrs = trial.user_attrs
    train = as_float(attrs.get("train_mae"))
    epochs = attrs.get("epochs")
    last_step = max(trial.intermediate_values) if trial.intermediate_values else None
    row: dict[str, Any] = {
        "number": trial.number,
        "state": trial.state.name,
        "val_mae": trial.value,
        "last_reported_val_mae": trial.intermediate_values[last_step] if last_step is not None else None,
        "gap": (trial.value - train) if trial.value is not None and train is not None else None,
        "worker": worker_label(trial),
        "epochs": epochs if epochs is not None else len(trial.intermediate_values) or None,
        "wall_s": gpu_seconds(trial) if trial.datetime_complete is not None else None,
        "duration_s": duration_s(trial),
        "datetime_start": _iso(trial.datetime_start),
        "datetime_complete": _iso(trial.datetime_complete),
    }
    row.update({key: attrs.get(key) for key in ATTR_COLUMNS})
    row.update({f"param_{k}": v for k, v in sorted(trial.params.items())})
    return row


def all_trials_csv(trials: Sequence[FrozenTrial]) -> str:
    """all_trials.csv: one row per trial, fixed columns first, then every parameter seen."""
    rows = [trial_row(t) for t in trials]
    params = sorted({k for r in rows for k in r if k.startswith("param_")})
    return csv_text(TRIAL_COLUMNS + params, rows)


def top_csv(selection: Selection, n: int) -> str:
    """top_N.csv: rank by validation MAE, with both errors, the gap and which one is selected."""
    top = selection.top(n)
    params = sorted({k for r in top for k in r.params})
    rows = []
    for rank, r in enumerate(top, 1):
        row = {"rank": rank, "trial": r.number, "selected": r.number == selection.best.number,
               "val_mae": r.val_mae, "train_mae": r.train_mae, "gap": r.gap,
               "gap_ratio": r.gap_ratio, "overfit": r.overfit, "worker": r.worker,
               "epochs": r.epochs, "wall_s": r.wall_s}
        row.update({f"param_{k}": r.params.get(k) for k in params})
        rows.append(row)
    header = ["rank", "trial", "selected", "val_mae", "train_mae", "gap", "gap_ratio", "overfit",
              "worker", "epochs", "wall_s", *[f"param_{k}" for k in params]]
    return csv_text(header, rows)


def best_record(study: optuna.Study, selection: Selection) -> dict[str, Any]:
    """best_params.json: the selected trial, why it was selected, and Optuna's own best."""
    return {
        "study": study.study_name,
        **selection.best.as_dict(),
        "selection": {"rule": selection.rule, "tolerance": selection.tolerance,
                      "max_gap_ratio": selection.max_gap_ratio,
                      "candidates": selection.n_candidates},
        "lowest_val_mae_trial": selection.lowest.number,
        "test_result": study.user_attrs.get("test_result"),
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class Section:
    """One block of the index page: a heading, some HTML, and where its files are."""

    title: str
    body_html: str
    anchor: str = ""


@dataclass
class Report:
    """What `write_report` produced, for the CLI summary and tests."""

    out_dir: Path
    files: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # figure name -> reason
    selection: Selection | None = None


def html_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape("" if v is None else str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


PAGE_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;
color:#222;padding:0 1rem}h1{margin-bottom:.2rem}nav a{margin-right:1rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}th,td{border:1px solid #ccc;
padding:.25rem .5rem;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}
.skip{color:#8a5a00;background:#fff6e0;padding:.5rem;border-left:4px solid #e0a000}
.caption{color:#555}section{margin-bottom:2.5rem}
"""


def render_page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """A self-contained HTML page: plotly's JS inlined once in the head, so it works offline."""
    from plotly.offline import get_plotlyjs

    nav = " ".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections if s.anchor)
    body = "\n".join(
        f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>{s.body_html}</section>'
        for s in sections
    )
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{PAGE_CSS}</style>"
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script></head><body>"
        f"<h1>{html.escape(title)}</h1><p class=\"caption\">{html.escape(subtitle)}</p>"
        f"<nav>{nav}</nav>{body}</body></html>\n"
    )


def figure_section(spec: FigureSpec, fig_html: str | None, rel_dir: str) -> Section:
    """A figure's block on the index page: the live plot (or why it is missing) and its files."""
    caption = f'<p class="caption">{html.escape(spec.caption)}</p>'
    if fig_html is None:
        body = f'<p class="skip">Not drawn: {html.escape(spec.skip_reason or "")}.</p>'
    else:
        links = (f'<p><a href="{rel_dir}/{spec.name}.html">own page</a> · '
                 f'<a href="{rel_dir}/{spec.name}.png">PNG</a></p>')
        body = caption + fig_html + links
    return Section(spec.title, body, anchor=spec.name)


def write_figure(spec: FigureSpec, fig_dir: Path) -> tuple[str, list[Path]]:
    """Write NAME.html (sharing plotly.min.js in fig_dir) and NAME.png; return the index div."""
    import matplotlib.pyplot as plt
    from plotly.offline import get_plotlyjs

    js = fig_dir / "plotly.min.js"
    if not js.exists():
        write_text_atomic(js, get_plotlyjs())
    fig = spec.plotly()
    page = fig_dir / f"{spec.name}.html"
    write_text_atomic(page, fig.to_html(include_plotlyjs="directory", full_html=True))
    png = fig_dir / f"{spec.name}.png"
    tmp = png.with_name(f".{png.name}.tmp.png")
    with warnings.catch_warnings():  # layout notes on tiny studies ("identical low and high ylims")
        warnings.simplefilter("ignore", UserWarning)
        mfig = spec.matplotlib()
        try:
            mfig.savefig(tmp, dpi=100, bbox_inches="tight")
            os.replace(tmp, png)
        finally:
            tmp.unlink(missing_ok=True)
            plt.close(mfig)
    div = fig.to_html(include_plotlyjs=False, full_html=False, default_width="100%")
    return div, [page, png]


def _summary_section(study: optuna.Study, selection: Selection | None,
                     counts: dict[str, int]) -> Section:
    attrs = study.user_attrs
    rows = [("trials", ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "none")]
    for key in ("budget", "sampler", "pruner", "split", "created_at", "hpopt_version"):
        if key in attrs:
            rows.append((key, str(attrs[key])))
    body = html_table(["", ""], rows)
    if selection is not None:
        b = selection.best
        body += "<h3>Selected trial</h3>" + html_table(
            ["trial", "val MAE (eV)", "train MAE (eV)", "gap (eV)", "val/train", "worker", "epochs"],
            [(b.number, b.val_mae, b.train_mae, b.gap, b.gap_ratio, b.worker, b.epochs)],
        ) + html_table(["parameter", "value"], sorted(b.params.items()))
        body += f'<p class="caption">Selection rule: {html.escape(selection.rule)}. '
        body += f"Lowest validation MAE: trial {selection.lowest.number}.</p>"
    test = attrs.get("test_result")
    if isinstance(test, dict):
        t = test.get
        body += "<h3>Held-out test (hpopt retrain)</h3>" + html_table(
            ["trial", "test MAE (eV)", "per atom", "baseline test MAE", "search val MAE",
             "trained on", "epochs", "model", "finished"],
            [(t("trial"), t("test_mae"), t("test_mae_per_atom"), t("baseline_test_mae"),
              t("search_val_mae"), "train+val" if t("include_val") else "train", t("epochs_run"),
              t("model_path"), t("finished_at"))])
    return Section("Summary", body, anchor="summary")


def _top_section(selection: Selection, n: int) -> Section:
    rows = [(rank, r.number, "yes" if r.number == selection.best.number else "", r.val_mae,
             r.train_mae, r.gap, r.gap_ratio, "overfit" if r.overfit else "", r.worker, r.epochs)
            for rank, r in enumerate(selection.top(n), 1)]
    table = html_table(["rank", "trial", "selected", "val MAE", "train MAE", "gap", "val/train",
                    "flag", "worker", "epochs"], rows)
    return Section(f"Top {n} trials", table, anchor="top")


def write_report(
    study: optuna.Study,
    out_dir: Path,
    *,
    top_n: int = 10,
    tolerance: float | None = None,
    max_gap_ratio: float | None = None,
    progress: Progress | None = None,
) -> Report:
    """Write every table and figure of a (snapshotted) study into out_dir."""
    require_plotting()
    if top_n < 1:
        raise HpoptError("--top must be at least 1")
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    report = Report(out_dir)
    trials = study.get_trials(deepcopy=False)
    kwargs = {k: v for k, v in (("tolerance", tolerance), ("max_gap_ratio", max_gap_ratio)) if v is not None}
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    try:
        report.selection = select_from_study(study, **kwargs)
    except HpoptError as exc:
        if any(t.state.name == "COMPLETE" for t in trials):
            raise  # a real problem (bad options, wrong direction), not "too early"
        report.skipped["best_params.json"] = str(exc)

    specs = study_figures(study)
    task = progress.add_task("writing report", total=3 + len(specs)) if progress else None

    def step(done: int, next_up: str) -> None:
        """Advance the bar and name what is being written now (fANOVA can take a while)."""
        if progress is not None and task is not None:
            progress.update(task, advance=done, description=next_up)

    step(0, "writing all_trials.csv")
    path = out_dir / "all_trials.csv"
    write_text_atomic(path, all_trials_csv(trials))
    report.files.append(path)
    step(1, "writing best_params.json, top-N")
    if report.selection is not None:
        path = out_dir / "best_params.json"
        write_json_atomic(path, best_record(study, report.selection), mode=0o644)
        report.files.append(path)
        path = out_dir / f"top_{top_n}.csv"
        write_text_atomic(path, top_csv(report.selection, top_n))
        report.files.append(path)
    step(1, "drawing figures")

    sections = [_summary_section(study, report.selection, counts)]
    if report.selection is not None:
        sections.append(_top_section(report.selection, top_n))
    for spec in specs:
        step(0, f"drawing {spec.title.lower()}")
        if spec.skip_reason:
            report.skipped[spec.name] = spec.skip_reason
            sections.append(figure_section(spec, None, "figures"))
        else:
            div, files = write_figure(spec, fig_dir)
            report.files.extend(files)
            sections.append(figure_section(spec, div, "figures"))
        step(1, "writing index.html")

    subtitle = (f"{len(trials)} trials, generated "
                f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} by hpopt report")
    path = out_dir / "index.html"
    write_text_atomic(path, render_page(f"Study {study.study_name}", subtitle, sections))
    report.files.append(path)
    step(1, "report written")
    return report
