"""The loss guard: non-finite losses and loss spikes, after llm-foundry's kill-loss-spike callback.

A step's loss is an outlier when it exceeds `spike_ratio` × the mean of the last `window` accepted losses (judged
once `min_history` of them are known). With `spike: stop`, `patience` outliers in a row end the run; with
`spike: skip`, each outlier batch is skipped (no update) and `patience` in a row still end the run, since skipping
is then not helping. A NaN/inf loss is never applied: `nan: skip` drops the batch, `nan: stop` ends the run.
The guard remembers the step at which the current run of outliers began, so the trainer can point `latest` at a
checkpoint from before the spike.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from smalto.config import GuardConfig

OK, SKIP, STOP = "ok", "skip", "stop"


class LossGuard:
    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=cfg.window)
        self.streak = 0
        self.streak_start: int | None = None
        self.skipped = 0
        self.reason = ""

    def check(self, step: int, loss: float) -> str:
        """The verdict for the loss of `step` (0-based, before the update): ok, skip or stop."""
        c = self.cfg
        if not math.isfinite(loss):
            self.reason = f"loss is {loss} at step {step}"
            if c.nan == "skip":
                self.skipped += 1
                return SKIP
            self.streak_start = step if self.streak_start is None else self.streak_start
            return STOP
        judged = c.spike != "off" and len(self.history) >= c.min_history
        mean = sum(self.history) / len(self.history) if self.history else math.inf
        if judged and loss > c.spike_ratio * mean:
            if self.streak == 0:
                self.streak_start = step
            self.streak += 1
            self.reason = (
                f"loss {loss:.4g} above {c.spike_ratio:g}× the rolling mean {mean:.4g} for {self.streak} step(s) "
                f"since step {self.streak_start}"
            )
            if self.streak >= c.patience:
                return STOP
            if c.spike == "skip":
                self.skipped += 1
                return SKIP
            return OK  # stop mode: apply, and wait for `patience` to tell a spike from a blip
        self.streak, self.streak_start = 0, None
        self.history.append(loss)
        return OK

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.history),
            "streak": self.streak,
            "streak_start": self.streak_start,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque(state["history"], maxlen=self.cfg.window)
        self.streak, self.streak_start, self.skipped = (
            state["streak"],
            state["streak_start"],
            state["skipped"],
        )
