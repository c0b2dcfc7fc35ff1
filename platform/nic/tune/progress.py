"""One line per trial event on stderr, so a search of many minutes shows what it is doing.

Ray Tune's own table is off (stages print their own progress, and trials run their stages quietly);
this callback runs on the driver and says when a trial starts, what each fold report says (the
metric ASHA decides on), and how each trial ends, with the count of finished trials.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from ray.tune import Callback

from nic.logs import stage_logger

log = stage_logger("tune")


class TrialProgress(Callback):
    def __init__(self, total: int, metric: str):
        self.total = total
        self.metric = metric
        self.started = time.monotonic()
        self.ended = 0

    def _log(self, message: str, level: int = logging.INFO) -> None:
        """A trial event with the minutes since the search began, to the terminal and tune.log."""
        elapsed = time.monotonic() - self.started
        log.log(level, f"[tune] {message} ({elapsed / 60:.1f} min)")

    @staticmethod
    def _tasks(trial: Any) -> str:
        return ",".join((trial.config or {}).get("tasks", ())) or "?"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._log(f"trial {trial.trial_id} started: tasks {self._tasks(trial)}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        value = result.get(self.metric)
        shown = "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
        what = "final" if result.get("complete") else f"after {result.get('folds_done', '?')} fold(s)"
        self._log(f"trial {trial.trial_id} ({self._tasks(trial)}): {self.metric} {shown} {what}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended += 1
        last = trial.last_result or {}
        how = "finished" if last.get("complete") else "stopped early by ASHA"
        self._log(f"trial {trial.trial_id} {how}; {self.ended}/{self.total} trials done")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended += 1
        self._log(f"trial {trial.trial_id} ({self._tasks(trial)}) failed; {self.ended}/{self.total} trials done; "
                  f"its error is in {trial.local_path or 'the experiment folder'}", logging.WARNING)
