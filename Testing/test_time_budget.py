"""--time-budget: durations are parsed as documented, the planner's arithmetic gives hand-computed schedules,
and a budgeted training run on a fake clock completes its shortened schedule (lr decayed to its last value,
ramp-ups and delays scaled, final checkpoint) by its deadline, or stops at the deadline when the machine slows."""
import json

import pytest
import torch

from semiseg.checkpoint import load_checkpoint, save_checkpoint
from semiseg.config import resolve_config
from semiseg.errors import SemiSegError
from semiseg.errors import CancelledError
from semiseg.run import load_run_data, prepare_run
from semiseg.schedules import learning_rate
from semiseg.train.budget import TimeBudget, parse_duration
from semiseg.train.loop import Trainer
from semiseg_trainer.cli import main
from semiseg_trainer.protocol import ProgressState


@pytest.mark.parametrize("text,seconds", [("30m", 1800), ("1h", 3600), ("90s", 90), ("1800", 1800), (1800, 1800),
                                          ("1h30m", 5400), ("1.5h", 5400), (" 45 min ", 2700), ("2M", 120)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "30x", "m", "-5m", "0", "30m10", "1e3", "h1"])
def test_parse_duration_rejects(bad):
    with pytest.raises(SemiSegError, match="time budget"):
        parse_duration(bad)


def test_a_bad_budget_is_one_error_line(tmp_path, capsys):
    rc = main(["--no-json", "train", "--data", "phantom:6", "--time-budget", "30x", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["semiseg: error: time budget '30x' is not a duration (examples: 30m, 1h, 90s, 1h30m, "
                               "1800)"]


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_plan_arithmetic_by_hand():
    """1000 s for a 30000-iteration recipe (val every 200, step lr 2500, ramp 30000, delay 1000) on a machine at
    2 s per iteration: after 2 warm-up + 5 calibration steps (t = 20 s) the 950 s left after the 3 % reserve
    hold 475 more iterations -> 482; 200/30000 of 482 is a validation every 3; the schedule scales by 482/30000.
    Once a validation is known to cost 15 s (at iteration 9, t = 39 s), the reserve grows by two validations
    (60 s), validations are spaced to cost at most 10 % of training (every ceil(15 / 0.2) = 75) and
    901 s / 2.2 s fit 409 more iterations -> 418."""
    clock = FakeClock()
    b = TimeBudget(1000, 30000, 200, 2500, {"rampup_iterations": 30000, "consistency_delay": 1000}, clock=clock)
    b.begin(0)
    planned_at = []
    for done in range(1, 8):
        clock.t = 2.0 * done + 6.0 if done >= 2 else 5.0  # a slow first step, then 2 s each: t(2) = 10, t(7) = 20
        if b.step_done(done):
            planned_at.append(done)
    assert planned_at == [7]
    p = b.plan(7)
    assert (p.iterations, p.val_every, p.lr_step) == (482, 3, 40)
    assert p.options == {"rampup_iterations": 482, "consistency_delay": 16}
    assert p.seconds_per_iteration == pytest.approx(2.0)
    clock.t = 24.0  # two more steps, then a validation
    b.note_pause(15.0, validation=True)
    clock.t = 39.0
    assert b.after_validation()
    p = b.plan(9)
    assert (p.iterations, p.val_every, p.validation_seconds) == (418, 75, 15.0)
    assert p.options == {"rampup_iterations": 418, "consistency_delay": 14}


def test_a_fast_machine_keeps_the_recipe():
    clock = FakeClock()
    b = TimeBudget(3600, 600, 100, 2500, {"rampup_iterations": 200}, clock=clock)
    b.begin(0)
    for done in range(1, 8):
        clock.t = 0.1 * done
        b.step_done(done)
    p = b.plan(7)
    assert (p.iterations, p.val_every, p.options) == (600, 100, {"rampup_iterations": 200})


PHANTOM_MT = {"data": "phantom:6", "labeled": 2, "method": "mean_teacher", "patch_size": (32, 32),
              "labeled_batch": 2, "unlabeled_batch": 2, "log_every": 5, "device": "cpu", "threads": 1,
              "checkpoint_every": 10}


def budgeted_run(tmp_path, budget, step_seconds, validation_seconds=5.0, should_stop=None, resume=False,
                 clock=None):
    """Mean Teacher on the phantom (recipe: 600 iterations, validation every 100, ramp 200, delay 50) with a fake
    clock: each training step advances it by ``step_seconds(step)``, each validation by ``validation_seconds``.
    ``resume``: continue the run in ``tmp_path`` from its config.json, as ``semiseg train --resume`` does."""
    if resume:
        cfg, data, _ = prepare_run({}, None, tmp_path, resume=True)
    else:
        cfg = resolve_config({**PHANTOM_MT, "time_budget": budget})
        assert (cfg.iterations, cfg.val_every, cfg.method_options["rampup_iterations"],
                cfg.method_options["consistency_delay"]) == (600, 100, 200, 50)
        data = load_run_data(cfg)
    clock = clock or FakeClock()
    events = []
    tr = Trainer(cfg, tmp_path, data, on_event=events.append, clock=clock, should_stop=should_stop)
    step_fn, validate_fn = tr.train_step, tr._validate

    def timed_step(batch, step):
        clock.t += step_seconds(step)
        return step_fn(batch, step)

    def timed_validation(step):
        clock.t += validation_seconds
        return validate_fn(step)

    tr.train_step, tr._validate = timed_step, timed_validation
    summary = tr.run(resume=resume)
    return tr, summary, events, clock


def test_budgeted_run_completes_its_shortened_schedule_by_the_deadline(tmp_path):
    tr, summary, events, clock = budgeted_run(tmp_path, "100s", lambda step: 2.0)
    plans = [e for e in events if e["event"] == "budget"]
    total = plans[-1]["iterations"]
    assert len(plans) >= 2 and plans[0]["iteration"] == 7  # after 2 warm-up + 5 calibration steps, then re-planned
    assert 20 < total < 50  # at most (100 s - reserve) / 2 s per iteration, validations included
    assert summary["iterations"] == total and not summary["stopped_at_deadline"]
    assert clock.t <= 100.0  # every step and validation fitted in the budget
    its = [e for e in events if e["event"] == "iteration"]
    assert its[-1]["iteration"] == total
    # the whole schedule was scaled to the run: lr at its last poly value, ramp and delay in proportion
    assert its[-1]["lr"] == pytest.approx(learning_rate(total - 1, 0.03, "poly", total))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["iterations"] == total
    assert cfg["method_options"]["rampup_iterations"] == round(200 * total / 600)
    assert cfg["method_options"]["consistency_delay"] == round(50 * total / 600)
    assert tr.method.weight(total - 1) > 0  # consistency active by the end (delay 50 of 600 would never come)
    # the remaining time is reported and only goes down; the final model is validated and checkpointed
    left = [e["remaining_s"] for e in its]
    assert left == sorted(left, reverse=True) and 0 <= left[-1] < 100
    vals = [e["iteration"] for e in events if e["event"] == "validation"]
    assert vals[-1] == total and len(vals) >= 2
    assert load_checkpoint(tmp_path / "last.pt")["training"]["step"] == total
    assert (tmp_path / "best.pt").is_file() and events[-1]["event"] == "finished"
    state = ProgressState()
    for e in events:
        state.update(e)
    assert state.iterations == total


def test_budgeted_run_stops_at_the_deadline_when_the_machine_slows_down(tmp_path):
    """Planned at 2 s per iteration, the steps then take 9 s (another program took the CPU): the run stops
    before the deadline with its last checkpoint at the iteration it reached."""
    tr, summary, events, clock = budgeted_run(tmp_path, "100s", lambda step: 2.0 if step < 10 else 9.0)
    assert summary["stopped_at_deadline"]
    assert clock.t <= 100.0
    reached = summary["iterations"]
    assert load_checkpoint(tmp_path / "last.pt")["training"]["step"] == reached
    assert events[-1]["event"] == "finished" and events[-1]["iteration"] == reached
    # the model it stopped at is validated too (a validation's time was kept back for it)
    assert [e["iteration"] for e in events if e["event"] == "validation"][-1] == reached
    assert max(e["iterations"] for e in events if e["event"] == "budget") > reached  # it had planned more



@pytest.mark.parametrize("fast", [1.0, 0.5])
def test_a_machine_that_speeds_up_gets_more_iterations_not_a_string_of_validations(tmp_path, fast):
    """Planned at 2 s per iteration, the steps then take ``fast`` s (another program left the CPU or GPU):
    each re-plan grows the cadence and the count, yet validations stay a cadence apart (a multiple of a
    grown cadence is not due at the next iteration) and the planned end is extended only by iterations
    that train at least TAIL_TRAINING_PER_VALIDATION times as long as the extra validation (5 s here)."""
    from semiseg.train.loop import TAIL_TRAINING_PER_VALIDATION
    tr, summary, events, clock = budgeted_run(tmp_path, "100s", lambda step: 2.0 if step < 15 else fast)
    vals = [e["iteration"] for e in events if e["event"] == "validation"]
    plans = [e for e in events if e["event"] == "budget"]
    assert clock.t <= 100.0 and vals[-1] == summary["iterations"] == plans[-1]["iterations"]
    for before, after in zip(vals, vals[1:]):
        plan = [p for p in plans if p["iteration"] <= before][-1]  # the plan in force after `before`
        assert after - before >= plan["val_every"] or after == plan["iterations"], (vals, plans)
    for previous, plan in zip(plans, plans[1:]):
        if plan["iteration"] == previous["iterations"]:  # extended at its planned end
            more = plan["iterations"] - plan["iteration"]
            assert more * fast >= TAIL_TRAINING_PER_VALIDATION * 5.0, plans


def test_a_resumed_budgeted_run_gets_what_was_left_of_its_budget(tmp_path):
    """A 100 s run cancelled after 40 s of its budget resumes (on another clock) with 60 s, not a new 100 s,
    and keeps scaling its schedule from the original 600-iteration recipe."""
    first = FakeClock()
    with pytest.raises(CancelledError):
        budgeted_run(tmp_path, "100s", lambda step: 2.0, should_stop=lambda: first.t >= 40.0, clock=first)
    saved = load_checkpoint(tmp_path / "last.pt")["training"]
    used = saved["budget"]["used_s"]
    assert 40.0 <= used <= 42.0 and saved["budget"]["recipe"]["iterations"] == 600

    second = FakeClock()
    second.t = 5000.0  # another process: its monotonic clock has nothing to do with the first one's
    tr, summary, events, clock = budgeted_run(tmp_path, None, lambda step: 2.0, resume=True, clock=second)
    left = [e["remaining_s"] for e in events if e["event"] == "iteration"]
    assert left[0] <= 100.0 - used
    assert summary["time_budget_s"] == 100.0
    assert summary["budget_elapsed_s"] == pytest.approx(used + (clock.t - 5000.0))
    assert summary["budget_elapsed_s"] <= 100.0 and not summary["stopped_at_deadline"]
    total = summary["iterations"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["iterations"] == total
    assert cfg["method_options"]["rampup_iterations"] == round(200 * total / 600)  # the original recipe's ramp


def test_resuming_a_run_whose_budget_is_spent_only_finishes_it(tmp_path):
    """A checkpoint whose budget is used up: the resumed run trains no further step and ends with the model
    it has, validated and checkpointed."""
    first = FakeClock()
    with pytest.raises(CancelledError):
        budgeted_run(tmp_path, "100s", lambda step: 2.0, should_stop=lambda: first.t >= 40.0, clock=first)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    reached = ckpt["training"]["step"]
    ckpt["training"]["budget"]["used_s"] = 100.0
    save_checkpoint(tmp_path / "last.pt", ckpt)
    tr, summary, events, clock = budgeted_run(tmp_path, None, lambda step: 2.0, resume=True)
    assert summary["iterations"] == reached and summary["stopped_at_deadline"]
    assert not [e for e in events if e["event"] == "iteration"]
    assert [e["iteration"] for e in events if e["event"] == "validation"] == [reached]
    assert events[-1]["event"] == "finished" and events[-1]["status"] == "completed"


def test_budget_is_a_config_field_the_job_protocol_can_send():
    cfg = resolve_config({"data": "phantom:6", "time_budget": "30m"})
    assert cfg.time_budget == "30m" and cfg.to_dict()["time_budget"] == "30m"
    assert resolve_config({"data": "phantom:6", "time_budget": 1800}).time_budget == 1800  # seconds also do


def test_the_terminal_progress_line_shows_the_budget():
    """Without JSON lines (a terminal), a budgeted run's start says the count is not final, each plan is
    one line, and the progress line shows the time left instead of a raw remaining_s term."""
    import io
    from semiseg_trainer.console import Reporter
    out = io.StringIO()
    report = Reporter(json_lines=False, stream=out)
    report({"event": "started", "method": "mean_teacher", "data": "acdc", "device": "cpu", "iteration": 0,
            "iterations": 30000, "time_budget_s": 1800.0})
    report({"event": "budget", "iteration": 7, "iterations": 5455, "val_every": 545,
            "seconds_per_iteration": 0.27, "remaining_s": 1790.0})
    report({"event": "iteration", "iteration": 10, "iterations": 5455, "lr": 0.01, "it_per_s": 3.6,
            "eta_s": 1512.0, "remaining_s": 1754.4, "loss": 0.5})
    lines = out.getvalue().split("\n")
    assert lines[0] == ("training mean_teacher on acdc (cpu), iterations 0→30000 at most; the 30m00s time budget "
                        "sets the count once it has measured the speed")
    assert lines[1] == "time budget: 5455 iterations at 0.27 s/it, validation every 545, 29m50s left"
    assert "10/5455 loss 0.5000 lr 1.00e-02 3.60 it/s ETA 25m12s (29m14s of the budget left)" in lines[2]
    assert "remaining_s" not in lines[2]
