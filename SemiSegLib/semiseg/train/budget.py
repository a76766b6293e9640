"""Training within a wall-clock budget (``--time-budget 30m``).

The run measures its own speed over its first iterations, then sets its iteration count so the whole
schedule fits the deadline: the learning-rate decay, the ramp-ups and delays (scaled in proportion to
the recipe: a 30000-iteration recipe squeezed into 600 iterations keeps its shape), the step-lr period
and the validation cadence (the recipe's number of validations, fewer where they would cost more than
``validation_share`` of the training time; the loop also validates the last iteration). It plans again after every validation (their cost is then known, and
a machine's speed drifts), and stops at the deadline whatever happens, with a final checkpoint.

The recipe's iteration count is the upper bound: a budget only shortens a run. The clock is injectable
(tests use a fake one); time spent before :meth:`TimeBudget.begin` (data loading) is not counted.
The budget is the whole run's: its state (time used, the original recipe) travels in the checkpoint, and a
resumed run gets what was left of it (:meth:`TimeBudget.state_dict` / :meth:`TimeBudget.load_state_dict`).
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Callable

from ..errors import SemiSegError

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str | float | int) -> float:
    """Seconds in ``30m``, ``1h``, ``90s``, ``1h30m``, ``1800`` or ``1.5h``; a number is seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "")
        parts = re.findall(r"(\d+(?:\.\d+)?)(h|min|m|s|)", s)
        if not s or "".join(n + u for n, u in parts) != s or (len(parts) > 1 and any(u == "" for _, u in parts)):
            raise SemiSegError(f"time budget '{text}' is not a duration (examples: 30m, 1h, 90s, 1h30m, 1800)")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise SemiSegError(f"time budget '{text}' must be a positive duration")
    return seconds


@dataclass
class BudgetPlan:
    iterations: int              # the run's new total
    val_every: int               # validation cadence (0 = none)
    lr_step: int                 # step-schedule period, scaled with the run
    options: dict                # the method's iteration-valued options, scaled with the run
    seconds_per_iteration: float
    validation_seconds: float    # mean measured cost of one validation (0 = none measured yet)


class TimeBudget:
    """``seconds`` of wall time from :meth:`begin`; the recipe (``iterations``, ``val_every``, ``lr_step``
    and the method's iteration-valued ``schedule_options``) is what gets scaled."""

    def __init__(self, seconds: float, iterations: int, val_every: int, lr_step: int, schedule_options: dict,
                 clock: Callable[[], float] = time.monotonic, warmup: int = 2, calibration: int = 5,
                 reserve_fraction: float = 0.03, validation_share: float = 0.1):
        self.seconds = float(seconds)
        self.recipe_iterations = iterations
        self.recipe_val_every = val_every
        self.recipe_lr_step = lr_step
        self.recipe_options = dict(schedule_options)
        self.clock = clock
        self.warmup, self.calibration = warmup, calibration
        self.reserve_fraction, self.validation_share = reserve_fraction, validation_share
        self.t0 = self.t_warm = None
        self.warm_step = self.start_step = 0
        self.paused = 0.0            # validation/checkpoint seconds since the warm-up mark
        self.validations: list[float] = []
        self.planned = False
        self.seconds_per_iteration = 0.0
        self.t_last = None           # end of the previous step, for the last step's duration
        self.pause_since_step = 0.0
        self.last_step_seconds = 0.0
        self.used_before = 0.0       # seconds used before a resume

    def state_dict(self) -> dict:
        """What a resumed run needs: the seconds used so far and the recipe the schedule is scaled from."""
        return {"used_s": self.elapsed(), "recipe": {
            "iterations": self.recipe_iterations, "val_every": self.recipe_val_every,
            "lr_step": self.recipe_lr_step, "options": dict(self.recipe_options)}}

    def load_state_dict(self, state: dict) -> None:
        """Continue a run's budget: the time already used counts, and the schedule keeps being scaled from
        the original recipe (the resumed run's config holds the already-shortened one). The speed is measured
        again (the run may resume on another machine)."""
        self.used_before = float(state["used_s"])
        recipe = state["recipe"]
        self.recipe_iterations, self.recipe_val_every = int(recipe["iterations"]), int(recipe["val_every"])
        self.recipe_lr_step, self.recipe_options = int(recipe["lr_step"]), dict(recipe["options"])

    # -------------------------------------------------------------------------------- clock
    def begin(self, step: int) -> None:
        self.t0 = self.t_last = self.clock()
        self.start_step = step

    def elapsed(self) -> float:
        """Seconds of the budget used: by earlier sessions of this run (resumed) and by this one."""
        return self.used_before + (self.clock() - self.t0 if self.t0 is not None else 0.0)

    def remaining(self) -> float:
        return max(self.seconds - self.elapsed(), 0.0)

    def validation_seconds(self) -> float:
        return sum(self.validations) / len(self.validations) if self.validations else 0.0

    def out_of_time(self) -> bool:
        """No time for another iteration and the final model's validation before the deadline."""
        step = max(self.seconds_per_iteration, self.last_step_seconds)  # a machine that slowed down since the plan
        return self.remaining() <= step + self.validation_seconds()

    def note_pause(self, seconds: float, validation: bool = False) -> None:
        """Time outside training steps (validation, checkpoints): not training speed."""
        if self.t_warm is not None:
            self.paused += seconds
        self.pause_since_step += seconds
        if validation:
            self.validations.append(seconds)

    # -------------------------------------------------------------------------------- planning
    def step_done(self, done: int) -> bool:
        """Called after every training step; True when the schedule should be (re)planned now."""
        now = self.clock()
        self.last_step_seconds = now - self.t_last - self.pause_since_step
        self.t_last, self.pause_since_step = now, 0.0
        if done == self.start_step + self.warmup or (self.t_warm is None and done > self.start_step + self.warmup):
            self.t_warm, self.warm_step, self.paused = self.clock(), done, 0.0
            return False
        return not self.planned and self.t_warm is not None and done >= self.warm_step + self.calibration

    def after_validation(self) -> bool:
        """Plan again once a validation's cost is known (only after the first plan)."""
        return self.planned

    def _speed(self, done: int) -> float:
        n = done - self.warm_step
        if self.t_warm is None or n <= 0:
            return self.seconds_per_iteration
        return max((self.clock() - self.t_warm - self.paused) / n, 1e-9)

    def plan(self, done: int) -> BudgetPlan:
        """The iteration count, cadence and scaled schedule that fit what is left of the budget."""
        s = self._speed(done)
        self.seconds_per_iteration = s
        v = self.validation_seconds()
        # kept back for the final checkpoint and evaluation (about two validations' worth)
        reserve = self.reserve_fraction * self.seconds + 2 * v
        left = self.remaining() - reserve
        fits = min(done + max(int(left // s), 0), self.recipe_iterations)  # without validations
        val_every = 0
        if self.recipe_val_every:  # the recipe's number of validations, unless they would cost too much
            val_every = max(int(round(self.recipe_val_every * fits / self.recipe_iterations)), 1)
            if v > 0:
                val_every = max(val_every, math.ceil(v / (self.validation_share * s)))
        per_iteration = s + (v / val_every if val_every else 0.0)
        total = max(min(done + max(int(left // per_iteration), 0), self.recipe_iterations), done)
        factor = total / self.recipe_iterations
        options = {k: max(int(round(v0 * factor)), 0) for k, v0 in self.recipe_options.items()}
        lr_step = max(int(round(self.recipe_lr_step * factor)), 1)
        self.planned = True
        return BudgetPlan(total, val_every, lr_step, options, s, v)


def schedule_options(method, options) -> dict:
    """The method's iteration-valued options present in ``options`` (``Method.schedule_options``)."""
    return {k: getattr(options, k) for k in getattr(method, "schedule_options", ()) if hasattr(options, k)}


def apply_plan(trainer, plan: BudgetPlan) -> None:
    """Give the run the planned schedule: loop, learning rate, method (its options and context)."""
    cfg = trainer.cfg
    cfg.iterations = plan.iterations
    cfg.lr_step = plan.lr_step
    if cfg.val_every:
        cfg.val_every = plan.val_every
    for k, v in plan.options.items():
        setattr(trainer.method.options, k, v)
        cfg.method_options[k] = v
    trainer.method.ctx.iterations = plan.iterations
