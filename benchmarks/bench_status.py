"""Seconds per `hpopt status` refresh on a 10,000-trial study in MariaDB, against the naive way.

Ours: `StatusCollector.collect()` (aggregate SQL on Optuna's schema). Baseline, in the same run on
the same database: `optuna.load_study(...).get_trials()` summarised in Python, both cold (a fresh
process per refresh, e.g. cron) and warm (one process polling: Optuna's cache keeps finished
trials, so only unfinished ones are re-read). The trials are written with bulk SQL inserts shaped
like a worker's (6 params, 12 user attrs, 20 intermediate values per trial) so setup takes seconds.

    python benchmarks/bench_status.py [--trials 10000] [--repeats 5]

The DB server is started in local mode by `hpopt db` in a temporary run directory (MariaDB must
be installed), so the collector is timed exactly as `hpopt status` runs it, DB probe included.
The `--watch` refresh is also timed the way it was before it kept its probe connection open (a new
one each refresh), for the ratio between the two.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterator

import optuna
import sqlalchemy as sa
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution, distribution_to_json

from hpopt.db.endpoint import sqlalchemy_url
from hpopt.db.probe import KeptProbe
from hpopt.db.server import collect_db_status
from hpopt.rundir import RunDir, write_json_atomic
from hpopt.status import StatusCollector, summarize_trials

SPACE = {
    "lr": FloatDistribution(1e-5, 1e-1, log=True),
    "batch_size": CategoricalDistribution([16, 32, 64, 128]),
    "n_layers": IntDistribution(1, 5),
    "n_nodes": IntDistribution(8, 128),
    "activation": CategoricalDistribution(["tanh", "relu", "gelu"]),
    "weight_decay": FloatDistribution(0.0, 1e-3),
}
N_WORKERS = 32


@contextmanager
def local_db(root: Path) -> Iterator[RunDir]:
    """A run directory with its DB server started in local mode by `hpopt db` itself."""
    from hpopt.config import Config
    from hpopt.db import server

    run = RunDir(root / "run")
    server.start(Config(), run, local=True)
    try:
        yield run
    finally:
        server.stop(run)


def populate(url: str, name: str, n_trials: int, seed: int = 0) -> datetime:
    """Create the study through Optuna (schema, directions, attrs), then the trials with bulk inserts.

    Returns when the first trial started (naive UTC)."""
    rng = random.Random(seed)
    study = optuna.create_study(study_name=name, storage=url, direction="minimize")
    study.set_user_attr("budget", n_trials + 2000)
    engine = sa.create_engine(url)
    meta = sa.MetaData()
    meta.reflect(engine, only=["trials", "trial_values", "trial_params", "trial_user_attributes",
                               "trial_intermediate_values", "studies"])
    t = meta.tables
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    with engine.begin() as conn:
        study_id = conn.execute(sa.select(t["studies"].c.study_id).where(t["studies"].c.study_name == name)).scalar()
        rows = []
        for number in range(n_trials):
            roll = rng.random()
            state = ("RUNNING" if number >= n_trials - N_WORKERS else "FAIL" if roll < 0.05
                     else "PRUNED" if roll < 0.2 else "COMPLETE")
            start = now - timedelta(seconds=(n_trials - number) * 30)
            rows.append({"number": number, "study_id": study_id, "state": state, "datetime_start": start,
                         "datetime_complete": None if state == "RUNNING" else start + timedelta(seconds=25)})
        conn.execute(sa.insert(t["trials"]), rows)
        ids = dict(conn.execute(sa.select(t["trials"].c.number, t["trials"].c.trial_id)
                                .where(t["trials"].c.study_id == study_id)).all())
        values, params, attrs, steps = [], [], [], []
        for row in rows:
            trial_id = ids[row["number"]]
            if row["state"] == "COMPLETE":
                values.append({"trial_id": trial_id, "objective": 0, "value": rng.uniform(0.01, 1.0),
                               "value_type": "FINITE"})
            for pname, dist in SPACE.items():
                internal = (rng.randrange(len(dist.choices)) if isinstance(dist, CategoricalDistribution)
                            else rng.randint(dist.low, dist.high) if isinstance(dist, IntDistribution)
                            else rng.uniform(dist.low, dist.high))
                params.append({"trial_id": trial_id, "param_name": pname, "param_value": float(internal),
                               "distribution_json": distribution_to_json(dist)})
            worker = row["number"] % N_WORKERS
            for key, value in {"worker_job_id": '"4242"', "array_index": str(worker), "host": '"atl1-1-02-003-5"',
                               "gpu": f'"{worker % 4}"', "wall_s": "812.5", "epochs": "20", "train_mae": "0.021",
                               "val_mae": "0.034", "val_mae_per_atom": "0.0011", "train_mae_per_atom": "0.0007",
                               "baseline_val_mae": "0.41", "device": '"cuda"'}.items():
                attrs.append({"trial_id": trial_id, "key": key, "value_json": value})
            for step in range(20):
                steps.append({"trial_id": trial_id, "step": step, "intermediate_value": 1.0 / (step + 1),
                              "intermediate_value_type": "FINITE"})
        for table, data in (("trial_values", values), ("trial_params", params),
                            ("trial_user_attributes", attrs), ("trial_intermediate_values", steps)):
            for chunk in range(0, len(data), 20000):
                conn.execute(sa.insert(t[table]), data[chunk:chunk + 20000])
    engine.dispose()
    return rows[0]["datetime_start"]


def timed(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    """Median seconds of `repeats` calls (after one warm-up call unless told otherwise)."""
    if warmup:
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def naive_refresh(storage: optuna.storages.BaseStorage, name: str) -> object:
    """What a status command does without aggregate SQL: load every trial, summarise in Python."""
    study = optuna.load_study(study_name=name, storage=storage)
    return summarize_trials(name, "mariadb", study.get_trials(deepcopy=False), "minimize",
                            study.user_attrs.get("budget"), datetime.now())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="hpopt-bench-") as tmp, local_db(Path(tmp)) as run:
        url = sqlalchemy_url(run)
        name = "bench"
        start = time.perf_counter()
        first_start = populate(url, name, args.trials)
        print(f"created {args.trials} trials in {time.perf_counter() - start:.1f} s")
        # the launch whose 32 workers ran them, so the per-worker counts are part of every refresh
        write_json_atomic(run.workers_file, {"launches": [
            {"job_id": "4242", "n_workers": N_WORKERS, "study": name, "via": "submitit", "gpu": True,
             "submitted_at": first_start.replace(tzinfo=timezone.utc).isoformat(), "log_dir": str(run.logs_dir)}]})

        probe_free = {"db_status": lambda *_: {"reachable": True}}  # the study part alone, like naive
        # the watch as it was: a new probe connection each refresh (collect_db_status without `kept`)
        reconnecting = {"db_status": lambda run_dir, slurm: collect_db_status(run_dir, slurm)}

        def ours(fresh: bool, **kwargs: object) -> Callable[[], object]:
            kept = StatusCollector(run, study=name, use_slurm=False, **kwargs)

            def check(report: dict) -> dict:
                assert report["study"]["available"] and report["study"]["counts"]["running"] == N_WORKERS
                assert sum(t["trials_finished"] for t in report["workers"]["tasks"]) > 0.9 * args.trials
                return report

            def refresh() -> object:  # Slurm left out: the naive side makes no Slurm calls either
                if not fresh:
                    return check(kept.collect())
                with StatusCollector(run, study=name, use_slurm=False, **kwargs) as once:  # like `hpopt status`
                    return check(once.collect())
            return refresh

        warm_storage = optuna.storages.get_storage(url)
        kept_probe = KeptProbe()
        r = args.repeats
        results = {
            "hpopt status refresh, cold (new collector)": timed(ours(True), r),
            "hpopt status refresh, warm (--watch)": timed(ours(False), r),
            "  warm, new probe connection per refresh (before)": timed(ours(False, **reconnecting), r),
            "  DB probe alone, kept connection (--watch)": timed(
                lambda: collect_db_status(run, None, kept=kept_probe), r),
            "  DB probe alone, new connection": timed(lambda: collect_db_status(run, None), r),
            "  study part alone, cold": timed(ours(True, **probe_free), r),
            "  study part alone, warm": timed(ours(False, **probe_free), r),
            "naive get_trials() + summary, cold": timed(
                lambda: naive_refresh(optuna.storages.get_storage(url), name), max(1, r // 2), warmup=False),
            "naive get_trials() + summary, warm (Optuna cache)": timed(lambda: naive_refresh(warm_storage, name), r),
        }
        kept_probe.close()
    print(f"\nseconds per refresh, {args.trials} trials, median of {r} ({max(1, r // 2)} for naive cold); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs:")
    for label, seconds in results.items():
        print(f"  {label:52s} {seconds:8.3f} s")
    full_c, full_w, full_before, probe_kept, probe_new, study_c, study_w, naive_c, naive_w = results.values()
    print(f"\nratio naive / hpopt status, like for like (study part): cold {naive_c / study_c:.1f}x, "
          f"warm {naive_w / study_w:.1f}x")
    print(f"ratio naive / whole hpopt status refresh (DB probe included): cold {naive_c / full_c:.1f}x, "
          f"warm {naive_w / full_w:.1f}x")
    print(f"ratio --watch refresh, new probe connection / kept one: {full_before / full_w:.1f}x "
          f"(DB probe alone: {probe_new / probe_kept:.1f}x)")


if __name__ == "__main__":
    main()
