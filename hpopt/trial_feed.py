"""A worker's incremental, lean view of its study's trials on MariaDB.

The sampler and the duration estimate need, per trial, its number, state, value, parameters and
wall time, nothing else. Optuna's `get_trials` loads every new trial through the ORM with all
its attributes and intermediate values: with 8 workers each re-reading every trial of the
fleet, that was the largest CPU cost per trial after sampling. `TrialFeed` reads the same rows
with four Core queries per refresh, only for trials that are new or were unfinished last time,
and keeps the rest.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from optuna.distributions import BaseDistribution, json_to_distribution
from optuna.storages import BaseStorage
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState

from hpopt.storage import mysql_engine

_TRIALS = models.TrialModel.__table__
_PARAMS = models.TrialParamModel.__table__
_VALUES = models.TrialValueModel.__table__
_USER = models.TrialUserAttributeModel.__table__
_UNFINISHED = (TrialState.RUNNING, TrialState.WAITING)


class TrialFeed:
    """The trials of one study, refreshed incrementally; trials are FrozenTrials whose user attrs
    hold only `wall_s` and whose system attrs and intermediate values are empty."""

    def __init__(self, study_id: int) -> None:
        self.study_id = study_id
        self.trials: dict[int, FrozenTrial] = {}  # by trial id, in id order
        self.distributions: dict[str, BaseDistribution] = {}  # parsed once per distinct JSON

    def read(self, storage: BaseStorage) -> list[FrozenTrial]:
        """All trials, after re-reading those that are new or were unfinished last time."""
        engine = mysql_engine(storage)
        assert engine is not None, "TrialFeed needs MariaDB/MySQL"
        unfinished = [tid for tid, t in self.trials.items() if t.state in _UNFINISHED]
        newest = max(self.trials, default=0)
        with engine.begin() as conn:
            rows = conn.execute(sa.select(_TRIALS.c.trial_id, _TRIALS.c.number, _TRIALS.c.state,
                                          _TRIALS.c.datetime_start, _TRIALS.c.datetime_complete)
                                .where(_TRIALS.c.study_id == self.study_id,
                                       sa.or_(_TRIALS.c.trial_id > newest, _TRIALS.c.trial_id.in_(unfinished)))
                                .order_by(_TRIALS.c.trial_id)).all()
            changed = [row.trial_id for row in rows]
            finished = [row.trial_id for row in rows if row.state not in _UNFINISHED]
            params: dict[int, dict[str, tuple[float, str]]] = {tid: {} for tid in changed}
            if changed:
                for tid, name, value, dist in conn.execute(
                        sa.select(_PARAMS.c.trial_id, _PARAMS.c.param_name, _PARAMS.c.param_value,
                                  _PARAMS.c.distribution_json).where(_PARAMS.c.trial_id.in_(changed))):
                    params[tid][name] = (value, dist)
            values: dict[int, float] = {}
            walls: dict[int, Any] = {}
            if finished:
                values = {tid: models.TrialValueModel.stored_repr_to_value(value, kind) for tid, value, kind in
                          conn.execute(sa.select(_VALUES.c.trial_id, _VALUES.c.value, _VALUES.c.value_type)
                                       .where(_VALUES.c.trial_id.in_(finished), _VALUES.c.objective == 0))}
                walls = {tid: json.loads(raw) for tid, raw in conn.execute(
                    sa.select(_USER.c.trial_id, _USER.c.value_json)
                    .where(_USER.c.trial_id.in_(finished), _USER.c.key == "wall_s"))}
        for row in rows:
            dists = {name: self._distribution(dist) for name, (_, dist) in params[row.trial_id].items()}
            self.trials[row.trial_id] = FrozenTrial(
                number=row.number, state=row.state, value=values.get(row.trial_id),
                datetime_start=row.datetime_start, datetime_complete=row.datetime_complete,
                params={name: dists[name].to_external_repr(value)
                        for name, (value, _) in params[row.trial_id].items()},
                distributions=dists,
                user_attrs={"wall_s": walls[row.trial_id]} if row.trial_id in walls else {},
                system_attrs={}, intermediate_values={}, trial_id=row.trial_id)
        return list(self.trials.values())

    def _distribution(self, raw: str) -> BaseDistribution:
        if raw not in self.distributions:
            self.distributions[raw] = json_to_distribution(raw)
        return self.distributions[raw]
