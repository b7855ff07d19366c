"""Rendering of a status report (the dict from hpopt/status.py) with rich.

Only reads the report, so the screen shows exactly what `hpopt status --json` prints.
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.padding import Padding
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

STATE_STYLE = {"running": "green", "pending": "yellow", "completed": "blue", "failed": "bold red",
               "cancelled": "magenta", "unknown": "dim"}
SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def duration(seconds: float | None) -> str:
    """'3d04h', '2h05m', '4m10s', '12s': compact enough for a table cell."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{s:02d}s" if minutes else f"{s}s"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def db_panel(db: dict[str, Any]) -> Panel:
    """Job, state (with the pending reason), where, how long, reachable, connections."""
    lines: list[Text] = []
    if not db.get("started"):
        lines.append(Text("no DB started yet (run `hpopt db start`, or run locally with the journal)", style="dim"))
    else:
        state = db.get("state") or "UNKNOWN"
        head = Text.assemble(f"job {db['job_id']}" if db.get("job_id") else "local server", "  ",
                             (state, "green" if state == "RUNNING" else "yellow" if state == "PENDING" else "red"))
        if db.get("reason"):
            head.append(f" ({db['reason']})", style="yellow")
        if db.get("host"):
            head.append(f"  on {db.get('node') or db['host']}:{db.get('port')}")
        lines.append(head)
        timing = []
        if db.get("uptime_s") is not None:
            timing.append(f"up {duration(db['uptime_s'])}")
        if db.get("time_left"):
            timing.append(f"{db['time_left']} left")
        if db.get("renewal_scheduled") is not None:
            timing.append("renewal scheduled" if db["renewal_scheduled"] else "no renewal scheduled")
        if timing:
            lines.append(Text(", ".join(timing)))
        if db.get("reachable"):
            rtt = f"{db['rtt_ms']:.1f} ms" if isinstance(db.get("rtt_ms"), (int, float)) else "?"
            conns = db.get("connections")
            lines.append(Text.assemble(("reachable", "green"), f" (round trip {rtt})",
                                       f", {conns} open connections" if conns is not None else ""))
        else:
            lines.append(Text("not reachable" + (f": {db['error']}" if db.get("error") else ""), style="red"))
    return Panel(Group(*lines), title="Database", title_align="left", box=box.ROUNDED)


def workers_panel(workers: dict[str, Any]) -> Panel:
    """One row per array task, then the log tails of the failed ones and a summary line."""
    tasks = workers["tasks"]
    parts: list[RenderableType] = []
    if not tasks:
        parts.append(Text("no workers launched yet (run `hpopt launch`)", style="dim"))
    else:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, expand=False)
        for column in ("task", "state", "node", "GPU", "elapsed", "left", "trial", "done", "exit"):
            table.add_column(column, justify="right" if column in ("trial", "done") else "left")
        for task in tasks:
            state = Text(task["state"], style=STATE_STYLE.get(task["bucket"], ""))
            if task.get("reason"):
                state.append(f" ({task['reason']})", style="dim")
            trial = task.get("current_trial")
            table.add_row(task["key"], state, task.get("node") or "-", task.get("gpu") or "-",
                          task.get("elapsed") or "-", task.get("time_left") or "-",
                          f"#{trial}" if trial is not None else "-", str(task.get("trials_finished", 0)),
                          task.get("exit_code") or "-")
        parts.append(table)
        for task in tasks:
            if task["bucket"] == "failed":
                body = "\n".join(task.get("log_tail") or []) or "(no log found)"
                title = f"{task['key']} failed, exit {task.get('exit_code') or '?'}: " + (task.get("log_file") or "no log")
                parts.append(Panel(Text(body, style="dim"), title=title, title_align="left", box=box.MINIMAL))
    if workers.get("other_launches"):
        parts.append(Text(f"{workers['other_launches']} launch(es) of other studies not shown (--study NAME)",
                          style="dim"))
    summary = workers["summary"]
    line = Text()
    for name in ("running", "pending", "completed", "failed", "cancelled", "unknown"):
        if name == "unknown" and not summary.get(name):
            continue
        if line:
            line.append(" · ", style="dim")
        line.append(f"{summary.get(name, 0)} {name}", style=STATE_STYLE[name] if summary.get(name) else "dim")
    parts.append(line)
    return Panel(Group(*parts), title="Workers", title_align="left", box=box.ROUNDED)


def study_panel(study: dict[str, Any]) -> Panel:
    """Counts against the budget, best trial, rate and ETA."""
    if not study.get("available"):
        body: RenderableType = Text(study.get("error") or "no study", style="dim")
        return Panel(body, title="Study", title_align="left", box=box.ROUNDED)
    counts = study["counts"]
    lines: list[RenderableType] = []
    line = Text()
    for name in ("complete", "pruned", "fail", "running", "waiting"):
        if line:
            line.append(" · ", style="dim")
        line.append(f"{counts.get(name, 0)} {name}")
    lines.append(line)
    budget = study.get("budget")
    if budget:
        progress = Table.grid(padding=(0, 1))
        progress.add_row(ProgressBar(total=budget, completed=min(study["finished"], budget), width=40),
                         Text(f"{study['finished']}/{budget} finished"))
        lines.append(progress)
    else:
        lines.append(Text(f"{study['finished']} finished, no budget set", style="dim"))
    best = study.get("best")
    if best:
        params = ", ".join(f"{k}={_value(v)}" for k, v in sorted(best["params"].items()))
        lines.append(Text.assemble(("best ", "dim"), (_value(best["value"]), "bold green"),
                                   f" (trial #{best['number']}, {study['direction']})"))
        if params:
            lines.append(Padding(Text(params, style="dim"), (0, 0, 0, 2)))
    else:
        lines.append(Text("no completed trial yet", style="dim"))
    window = study.get("rate_window_s") or 3600.0
    span = "the last hour" if window >= 3600 else f"the last {duration(window)} (since the first of them started)"
    rate = Text(f"{study['trials_per_hour']:.1f} trials/hour over {span}")
    if study.get("eta_s") is not None:
        rate.append(", budget reached" if study["eta_s"] == 0 else f", ETA to budget {duration(study['eta_s'])}")
    lines.append(rate)
    title = f"Study {study['name']} ({study['storage']})"
    return Panel(Group(*lines), title=title, title_align="left", box=box.ROUNDED)


def warnings_panel(warnings: list[dict[str, str]]) -> RenderableType:
    if not warnings:
        return Text("✓ nothing needs attention", style="green")
    lines = [Text.assemble((f"{w['severity']}: ", SEVERITY_STYLE.get(w["severity"], "")), w["message"])
             for w in warnings]
    return Group(*lines)


def render(report: dict[str, Any]) -> RenderableType:
    """The whole screen for one report."""
    header = Text.assemble(("hpopt status", "bold"), f"  {report['run_dir']}",
                           (f"  {report['generated_at']}  ({report['refresh_s']:.2f} s)", "dim"))
    if not report["slurm"]["available"]:
        header.append("  Slurm not available here (local mode)", style="dim")
    return Group(header, db_panel(report["db"]), workers_panel(report["workers"]),
                 study_panel(report["study"]), warnings_panel(report["warnings"]))
