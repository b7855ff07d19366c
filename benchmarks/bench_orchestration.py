"""Orchestration overhead per trial: hpopt workers vs. a plain shared Optuna study, same MariaDB.

Both sides run N worker processes against one study with an instant objective, so every
millisecond measured is orchestration (sampling, DB round trips, budget bookkeeping):

* plain: the predecessor's way: each process `optuna.create_study(storage=mysql+pymysql URL,
  load_if_exists=True)` with the default TPE sampler and default engine, then ask/tell
  `trials / workers` times (the study is created once up front so no process crashes racing).
* hpopt: `hpopt study create` equivalent, then N processes of `run_worker` (budget, reaper,
  heartbeats, per-trial user attrs, windowed parallel TPE) with a trainer that returns at once.

Latency is the time between one objective call ending and the next one starting in the same
process (tell + budget check + ask). Every process imports its modules before a common start
signal (hpopt workers import torch to pick their device: ~2 s of CPU each), so one-off start-up
is not counted as per-trial overhead on either side. Printed: p50/p95 over all trials and over the late half,
trials/s, budget overshoot, and the hpopt/plain ratios.

    python benchmarks/bench_orchestration.py              # 4000 trials, 8 workers (~4 min on 2 cores)
    python benchmarks/bench_orchestration.py --quick      # 800 trials, 8 workers
    python benchmarks/bench_orchestration.py --url mysql+pymysql://u:p@host:port/db

Without --url a throwaway mariadbd is started on a free loopback port in a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

SPACE = {
    "optim": {"lr": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
              "weight_decay": {"type": "float", "low": 1e-8, "high": 1e-2, "log": True}},
    "model": {"num_layers": {"type": "int", "low": 1, "high": 5},
              "num_nodes": {"type": "int", "low": 8, "high": 128},
              "activation": {"type": "categorical", "choices": ["tanh", "relu", "silu"]}},
}


def objective(values: dict[str, Any]) -> float:
    import math

    return abs(math.log10(values["optim.lr"]) + 3) + values["model.num_layers"] / 10 + values["model.num_nodes"] / 1000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def throwaway_mariadb() -> Iterator[str]:
    """A private mariadbd (server defaults, 151 connections) on a free loopback port."""
    with tempfile.TemporaryDirectory(prefix="hpopt-bench-db-") as tmp:
        base, port = Path(tmp), free_port()
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={base / 'data'}", "--user=root",
                        "--skip-test-db", "--auth-root-authentication-method=socket"], check=True, capture_output=True)
        server = subprocess.Popen(
            ["mariadbd", "--no-defaults", f"--datadir={base / 'data'}", f"--socket={base / 'sock'}", f"--port={port}",
             "--bind-address=127.0.0.1", "--user=root", "--skip-log-bin", "--skip-name-resolve",
             f"--log-error={base / 'error.log'}", f"--pid-file={base / 'pid'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sql = "CREATE DATABASE hpopt; CREATE USER 'bench'@'%' IDENTIFIED BY 'bench-pw'; GRANT ALL ON hpopt.* TO 'bench'@'%';"
        deadline = time.monotonic() + 60
        while subprocess.run(["mariadb", f"--socket={base / 'sock'}", "-uroot", "-e", sql], capture_output=True).returncode:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                sys.exit(f"mariadbd did not start: {(base / 'error.log').read_text()[-1000:]}")
            time.sleep(0.3)
        try:
            yield f"mysql+pymysql://bench:bench-pw@127.0.0.1:{port}/hpopt"
        finally:
            server.terminate()
            server.wait(timeout=60)


def plain_worker(url: str, name: str, n_trials: int, out: "mp.Queue[list[tuple[float, float]]]",
                 start: Any) -> None:
    import optuna

    from hpopt.space import parse_space

    start.wait()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = parse_space(SPACE)
    study = optuna.create_study(storage=url, study_name=name, load_if_exists=True)
    samples = []
    previous_end, previous_tell = None, 0.0
    for _ in range(n_trials):
        start = time.perf_counter()
        trial = study.ask()
        values = space.suggest(trial)
        ask_done = time.perf_counter()
        value = objective(values)
        study.tell(trial, value)
        end = time.perf_counter()
        # same definition as hpopt's: previous tell .. this ask
        if previous_end is not None:
            samples.append((end, previous_tell + (ask_done - start)))
        previous_tell, previous_end = end - ask_done, end
    out.put(samples)


def hpopt_worker(run_root: str, name: str, index: int, out: "mp.Queue[list[tuple[float, float]]]",
                 start: Any) -> None:
    from hpopt.rundir import RunDir
    from hpopt.worker import pick_device, run_worker

    pick_device()  # imports torch, as every worker does at start
    start.wait()
    marks: list[tuple[float, float]] = []  # (objective start, objective end)

    def trainer(config: dict[str, Any], split: str, on_epoch: Any, device: str) -> dict[str, float]:
        start = time.perf_counter()
        flat = {"optim.lr": config["optim"]["lr"], "model.num_layers": config["model"]["num_layers"],
                "model.num_nodes": config["model"]["num_nodes"]}
        value = objective(flat)
        marks.append((start, time.perf_counter()))
        return {"val_mae": value, "train_mae": value, "epochs_run": 1}

    run_worker(RunDir(Path(run_root)), name, worker_tag=f"bench-{index}", trainer=trainer)
    out.put([(end_next, start_next - end) for (_, end), (start_next, end_next) in zip(marks, marks[1:])])


def run_all(procs: list[Any], start: Any, queue: "mp.Queue[list[tuple[float, float]]]") -> list[tuple[float, float]]:
    """Start the processes, release them together once all have imported, collect samples."""
    for proc in procs:
        proc.start()
    start.wait()
    samples: list[tuple[float, float]] = []
    for _ in procs:
        samples += queue.get()
    for proc in procs:
        proc.join()
        if proc.exitcode:
            sys.exit(f"a worker process failed (exit {proc.exitcode})")
    return sorted(samples)


def summarize(label: str, samples: list[tuple[float, float]], trials: int, wall: float) -> dict[str, float]:
    lat = [s for _, s in samples]
    late = [s for _, s in samples[len(samples) // 2:]]
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] * 1000  # noqa: E731
    row = {"p50": q(lat, 50), "p95": q(lat, 95), "late_p50": q(late, 50), "late_p95": q(late, 95),
           "tps": trials / wall, "wall": wall}
    print(f"{label:6s} {trials:6d} trials in {wall:6.1f} s = {row['tps']:6.1f} trials/s | ask+tell p50 {row['p50']:6.1f} ms "
          f"p95 {row['p95']:6.1f} ms | late half p50 {row['late_p50']:6.1f} ms p95 {row['late_p95']:6.1f} ms", flush=True)
    return row


def write_records(run_root: Path, url: str) -> None:
    """Endpoint + credentials files as `hpopt db` writes them, so workers find the DB as in production."""
    from hpopt.rundir import RunDir, write_json_atomic

    parsed = urlparse(url)
    run = RunDir(run_root).ensure()
    write_json_atomic(run.endpoint_file, {"host": parsed.hostname, "port": parsed.port, "job_id": "",
                                          "started_at": "1970-01-01T00:00:00+00:00", "mode": "local",
                                          "schema": parsed.path.lstrip("/"), "datadir": "", "pid": 0})
    write_json_atomic(run.credentials_file, {"user": parsed.username, "password": parsed.password,
                                             "schema": parsed.path.lstrip("/")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="800 trials (a smoke run)")
    parser.add_argument("--url", help="use this MariaDB/MySQL schema instead of a throwaway server")
    parser.add_argument("--skip-plain", action="store_true", help="measure hpopt only (no ratio)")
    args = parser.parse_args()
    trials = 800 if args.quick else args.trials
    ctx = mp.get_context("spawn")
    os.environ.setdefault("HPOPT_WORKER_POLL_S", "0.05")
    print(f"{trials} trials, {args.workers} worker processes, {os.cpu_count()} CPUs, instant objective", flush=True)
    with (contextlib.nullcontext(args.url) if args.url else throwaway_mariadb()) as url, \
            tempfile.TemporaryDirectory(prefix="hpopt-bench-run-") as tmp:
        import optuna

        from hpopt.rundir import RunDir
        from hpopt.space import parse_space
        from hpopt.storage import open_storage
        from hpopt.study import StudySpec, create_study

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        suffix = str(int(time.time()))
        write_records(Path(tmp), url)
        storage = open_storage(RunDir(Path(tmp)), create_schema=True)
        name = f"bench-hpopt-{suffix}"
        create_study(storage, StudySpec(name, parse_space(SPACE), budget=trials, pruner="none"))
        queue = ctx.Queue()
        start = ctx.Barrier(args.workers + 1)
        procs = [ctx.Process(target=hpopt_worker, args=(tmp, name, i, queue, start)) for i in range(args.workers)]
        ours_samples = run_all(procs, start, queue)
        done = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        finished = sum(t.state.is_finished() and t.state.name in ("COMPLETE", "PRUNED") for t in done)
        surplus = sum(bool(t.user_attrs.get("surplus")) for t in done)
        starts = [t.datetime_start for t in done if t.datetime_start]
        ends = [t.datetime_complete for t in done if t.datetime_complete]
        ours = summarize("hpopt", ours_samples, finished, (max(ends) - min(starts)).total_seconds())
        print(f"hpopt budget {trials}: {finished} finished, overshoot {finished - trials} "
              f"(bound: {args.workers}), {surplus} surplus asks given back", flush=True)
        if args.skip_plain:
            return

        plain_name = f"bench-plain-{suffix}"
        optuna.create_study(storage=url, study_name=plain_name)
        per = [trials // args.workers + (i < trials % args.workers) for i in range(args.workers)]
        start = ctx.Barrier(args.workers + 1)
        procs = [ctx.Process(target=plain_worker, args=(url, plain_name, n, queue, start)) for n in per]
        plain_samples = run_all(procs, start, queue)
        done = optuna.load_study(study_name=plain_name, storage=url).get_trials(deepcopy=False)
        starts = [t.datetime_start for t in done if t.datetime_start]
        ends = [t.datetime_complete for t in done if t.datetime_complete]
        plain = summarize("plain", plain_samples, len(done), (max(ends) - min(starts)).total_seconds())
        print(f"ratio  throughput {ours['tps'] / plain['tps']:.1f}x | late p50 latency {plain['late_p50'] / ours['late_p50']:.1f}x "
              f"lower | p50 {plain['p50'] / ours['p50']:.1f}x lower | targets: hpopt p50 <= 50 ms, >= 5x trials/s, "
              f"overshoot <= workers")


if __name__ == "__main__":
    main()
