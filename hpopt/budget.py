"""The fleet-wide trial budget, owned by hpopt rather than Optuna's MaxTrialsCallback.

MaxTrialsCallback counts neither RUNNING trials nor does it stop other processes (optuna#3518),
so N workers overshoot by up to N trials each. Our rule, applied by every worker before it asks:

* finished = COMPLETE + PRUNED. A pruned trial used its share of the budget, so it counts.
* FAIL does not count: a heartbeat-stale FAIL is re-run as a WAITING retry, and a trial whose
  training raised is a bug or a diverged configuration, not a sample. So a broken trainer does
  not loop forever, the fleet stops once failures reach twice the budget (stale, abandoned and
  surplus trials are FAIL too, so the bar is not lower).
* start a trial only if finished + running < budget (WAITING retries are popped first by ask);
  stop when finished >= budget. A worker that sees the budget claimed but not finished waits:
  a claimed slot may belong to a killed worker whose trial must be reaped and retried.
* two workers can both see one free slot; after asking, a worker whose trial ranks beyond the
  budget (retries first, then by trial number) gives it up as "surplus", so races overshoot by
  at most the number of workers and in practice by none.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

from optuna.trial import FrozenTrial, TrialState

RETRY_ATTR = "failed_trial"  # set by Optuna's RetryHeartbeatStaleTrialCallback on the retry


@dataclass(frozen=True)
class Tally:
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0

    @property
    def finished(self) -> int:
        return self.complete + self.pruned

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "finished": self.finished}


def tally(trials: Iterable[FrozenTrial]) -> Tally:
    counts = {state: 0 for state in TrialState}
    for trial in trials:
        counts[trial.state] += 1
    return tally_counts(counts)


def tally_counts(by_state: dict[TrialState, int]) -> Tally:
    counts = {state: by_state.get(state, 0) for state in TrialState}
    return Tally(complete=counts[TrialState.COMPLETE], pruned=counts[TrialState.PRUNED],
                 failed=counts[TrialState.FAIL], running=counts[TrialState.RUNNING],
                 waiting=counts[TrialState.WAITING])


def budget_reached(counts: Tally, budget: int) -> bool:
    return counts.finished >= budget


def failures_exhausted(counts: Tally, budget: int) -> bool:
    """Failures far beyond the budget: something is systematically wrong, stop the fleet."""
    return counts.failed >= max(2 * budget, 10)


def may_start(counts: Tally, budget: int) -> bool:
    return counts.finished + counts.running < budget


def near_end(counts: Tally, budget: int) -> bool:
    """Whether racing workers could overshoot now (only then is the post-ask recount worth it)."""
    return budget - counts.finished - counts.running <= counts.running + 1


def is_surplus(trials: Iterable[FrozenTrial], number: int, budget: int) -> bool:
    """Whether running trial `number` ranks beyond the budget among finished + running trials."""
    finished = 0
    running: list[tuple[int, int]] = []
    for trial in trials:
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            finished += 1
        elif trial.state == TrialState.RUNNING:
            running.append((0 if RETRY_ATTR in trial.system_attrs else 1, trial.number))
    running.sort()
    ranks = [n for _, n in running]
    return number in ranks and finished + ranks.index(number) >= budget
