"""The job protocol between the Slicer module and the trainer, end to end with real processes.

A real ``python -m semiseg_trainer run --job DIR`` on the phantom (tiny: 6 volumes, 2 labeled, 32×32,
batch 2+2, threads 1) driven by the module's own :class:`JobRunner`: started, progress, checkpoint,
cancel mid-run through the CANCEL sentinel (exit code 3, process gone, checkpoint valid), resume from
it to the end, a saved model, a segment job, and one ``error`` event for bad jobs. Fake trainer
executables cover what a real one should not do: crash without an event, ignore the cancel (the
process tree is killed after the grace period).
"""
from __future__ import annotations

import json
import os
import signal
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SemiSegExtension"))

from SemiSegSlicerLib import catalog, models  # noqa: E402
from SemiSegSlicerLib.process import JobRunner, descendant_pids, kill_process_tree, pid_alive, trainer_environment  # noqa: E402
from semiseg_trainer import cli, protocol  # noqa: E402

POSIX = not sys.platform.startswith("win")
TINY = {"data": "phantom:6", "labeled": 2, "patch_size": [32, 32], "labeled_batch": 2, "unlabeled_batch": 2,
        "iterations": 1000, "threads": 1, "device": "cpu", "val_every": 10, "log_every": 5, "checkpoint_every": 10,
        "method": "mean_teacher", "seed": 3}


# ------------------------------------------------------------------------------------------ pure protocol
def test_parser_buffers_partial_lines_and_wraps_foreign_output():
    p = protocol.EventParser()
    assert p.feed('{"event":"iter') == []
    assert p.feed('ation","iteration":5}\r\nWarning: something\n{"no_event":1}\n{"event":"chec') == [
        {"event": "iteration", "iteration": 5},
        {"event": "log", "level": "info", "message": "Warning: something"},
        {"event": "log", "level": "info", "message": '{"no_event":1}'}]
    assert p.flush() == [{"event": "log", "level": "info", "message": '{"event":"chec'}]  # torn last line kept as text


def test_progress_state_folds_events_into_status_and_plot_rows():
    s = protocol.ProgressState()
    for e in [{"event": "started", "iteration": 0, "iterations": 100},
              {"event": "iteration", "iteration": 10, "iterations": 100, "lr": 0.01, "eta_s": 125.0, "loss": 0.5, "sup": 0.4},
              {"event": "validation", "iteration": 10, "dice": 0.8123, "best_dice": 0.8123, "best": True},
              {"event": "iteration", "iteration": 20, "iterations": 100, "lr": 0.01, "eta_s": 61.0, "loss": 0.25, "sup": 0.2}]:
        s.update(e)
    assert s.fraction == 0.2
    assert s.status_text() == "iteration 20/100 · ETA 1m01s · loss 0.2500 · val Dice 81.2% (best 81.2%)"
    assert s.plot_columns() == ["iteration", "loss", "sup", "val_dice"]
    assert s.plot_rows() == [[10, 0.5, 0.4, 0.8123], [20, 0.25, 0.2, 0.8123]]
    s.update({"event": "started", "iteration": 10, "iterations": 100})  # resumed at 10: later rows dropped
    assert [r[0] for r in s.plot_rows()] == [10]
    # a time-budgeted run reports the time left until its deadline instead of an ETA
    s.update({"event": "iteration", "iteration": 30, "iterations": 100, "eta_s": 500.0, "remaining_s": 95.0,
              "loss": 0.2})
    assert s.status_text().startswith("iteration 30/100 · 1m35s left of the time budget · loss 0.2000")
    assert "remaining_s" not in s.plot_columns()


def test_diagnose_exit_gives_one_actionable_line():
    err = [{"event": "error", "message": "no labeled case", "details": "tb"}]
    assert protocol.diagnose_exit(2, err) == ("failed", "no labeled case", "tb")
    assert protocol.diagnose_exit(0, []) == ("completed", "completed", "")
    assert protocol.diagnose_exit(3, [])[0] == "cancelled"
    assert protocol.diagnose_exit(-9, [], "", killed=True)[:2] == (
        "cancelled", "cancelled (the process did not stop in time and was killed)")
    status, msg, _ = protocol.diagnose_exit(1, [], "Traceback...\nModuleNotFoundError: No module named 'torch'")
    assert status == "failed" and msg.startswith("PyTorch is not installed")
    assert "out of GPU memory" in protocol.diagnose_exit(1, [], "torch.OutOfMemoryError: CUDA out of memory.")[1]
    assert protocol.diagnose_exit(-9, [], "")[1].startswith("the trainer process was killed (exit code -9)")
    assert protocol.diagnose_exit(139, [], "boom\nSegmentation fault\n")[1] == \
        "the trainer process stopped unexpectedly (exit code 139): Segmentation fault"


@pytest.fixture(scope="module")
def panel():
    """The panel's catalog as ``semiseg catalog`` computes it (here in-process), read by the panel's reader."""
    from semiseg_trainer import panel_catalog
    return catalog.Catalog(json.loads(json.dumps(panel_catalog.build())))


def test_panel_catalog_and_training_config(panel):
    infos = {m.name: m for m in panel.methods(2)}
    assert list(infos)[0] == "supervised" and not infos["supervised"].uses_unlabeled
    mt = {o.name: o for o in infos["mean_teacher"].options}
    from semiseg.methods import METHODS
    assert infos["mean_teacher"].description == METHODS["mean_teacher"].description
    assert mt["consistency"].kind == "float" and mt["consistency"].default == 0.1
    assert mt["sup_loss"].kind == "choice" and "dice" in mt["sup_loss"].choices
    assert mt["rampup_iterations"].default == 30000  # 2D: the paper's ACDC value
    assert {o.name: o.default for o in panel.methods(3)[1].options}.get("rampup_iterations") in (6000, None)
    cfg = catalog.training_config("mean_teacher", 2, iterations=50, labeled_batch=2, device="cpu",
                                  method_options={"consistency": 0.3}, val_every=0)
    assert cfg == {"method": "mean_teacher", "dim": 2, "device": "cpu", "iterations": 50, "labeled_batch": 2,
                   "val_every": 0, "method_options": {"consistency": 0.3}}
    full = panel.resolved("mean_teacher", 2)
    assert full["preset"] == "generic2d" and full["unlabeled_batch"] == 12
    # the Advanced section's training options: every other TrainConfig field, with the values the run uses
    train = {o.name: o for o in panel.training_options("ss_net", 2, "acdc")}
    assert train["lr_schedule"].default == "constant" and train["lr_schedule"].kind == "choice"  # SS-Net's ACDC recipe
    assert train["ema_decay"].default == 0.99
    assert train["target_spacing"].kind == "floats" and train["foreground_share"].kind == "float"
    from semiseg_trainer.panel_catalog import PANEL_FIELDS
    assert not set(train) & (PANEL_FIELDS | {"method_options"})
    from semiseg.config import TrainConfig
    assert set(train) | PANEL_FIELDS == {f for f in TrainConfig.__dataclass_fields__}
    # engine-internal fields are not user options: ICL's run settings never reach the panel
    icl = {o.name for o in infos["icl"].options}
    assert "run" not in icl and all(o.default is not None for m in infos.values() for o in m.options)
    # an impossible combination carries the engine's one line instead of values
    assert panel.resolved("mean_teacher", 3, "acdc") == {} and panel.training_options("mean_teacher", 3, "acdc") == []
    assert "\n" not in panel.recipe("mean_teacher", 3, "acdc")["error"]
    dev = panel.devices
    assert dev["choices"][-1][0] == "cpu" and dev["choices"][0][0] == "auto" and dev["torch"]


def test_catalog_comes_from_a_trainer_process_and_is_cached(tmp_path):
    """Slicer's process never imports torch: the catalog is the output of ``semiseg catalog`` in a child
    process, cached on disk; a cached copy is used without starting a process."""
    from SemiSegSlicerLib import process
    command = process.trainer_module_command(["catalog"])
    env = trainer_environment()
    first = catalog.load(tmp_path, command, env, process.package_roots())
    (cached,) = tmp_path.glob("catalog-*.json")
    assert [m.name for m in first.methods(2)][0] == "supervised"
    broken = process.trainer_module_command(["no-such-command"])  # same Python: same cache key
    again = catalog.load(tmp_path, broken, env, process.package_roots())
    assert again.data == first.data  # read from the cache: the broken command was never run
    with pytest.raises(catalog.CatalogError) as e:
        catalog.load(tmp_path, broken, env, process.package_roots(), refresh=True)
    assert "\n" not in str(e.value) and "no-such-command" in str(e.value)
    cached.write_text("{torn")
    assert catalog.load(tmp_path, command, env, process.package_roots()).data == first.data  # asked again


# ------------------------------------------------------------------------------------------ real trainer
def run_job(job: Path, spec: dict, **kw) -> JobRunner:
    protocol.write_job(job, spec)
    runner = JobRunner(job, **kw)
    runner.start()
    return runner


def test_train_cancel_resume_save_and_segment_end_to_end(tmp_path):
    from semiseg.checkpoint import load_checkpoint
    job = tmp_path / "job"
    seen: list[dict] = []
    runner = None

    def on_event(e):
        seen.append(e)
        if e["event"] == "checkpoint" and not runner.cancel_requested:
            runner.cancel(grace_seconds=60)  # graceful: must not need the kill

    runner = run_job(job, {"task": "train", "config": TINY}, on_event=on_event)
    pid = runner.backend.pid()
    result = runner.wait(timeout=120)
    assert result is not None and result.status == "cancelled" and result.exit_code == protocol.EXIT_CANCELLED
    assert not result.killed and not pid_alive(pid) and descendant_pids(pid) == []
    kinds = [e["event"] for e in seen]
    assert kinds[0] == "started" and "iteration" in kinds and kinds[-1] == "finished"
    stopped_at = seen[-1]["iteration"]
    assert seen[-1]["status"] == "cancelled" and 10 <= stopped_at < 100
    last = load_checkpoint(job / "run/last.pt")  # valid and at the cancelled iteration
    assert last["training"]["step"] == stopped_at and last["iteration"] == stopped_at
    assert protocol.cancel_requested(job)

    # resume from the checkpoint (write_job clears the sentinel); the first run's 1000 iterations only
    # leave the cancel a wide margin on a loaded machine: the resumed run ends 12 iterations later
    spec = protocol.read_job(job)
    spec["resume"] = True
    end = spec["config"]["iterations"] = stopped_at + 12
    seen.clear()
    runner = run_job(job, spec, on_event=seen.append)
    result = runner.wait(timeout=120)
    assert result.ok and result.exit_code == 0, result.message
    assert seen[0]["event"] == "started" and seen[0]["iteration"] == stopped_at
    iterations = [e["iteration"] for e in seen if e["event"] == "iteration"]
    assert iterations[0] > stopped_at and iterations[-1] == end
    assert seen[-1]["event"] == "finished" and seen[-1]["status"] == "completed"
    state = runner.progress
    assert state.fraction == 1.0 and state.val_dice is not None
    assert state.status_text().startswith(f"iteration {end}/{end}")
    assert state.plot_columns()[:2] == ["iteration", "loss"] and state.plot_columns()[-1] == "val_dice"
    logged = protocol.read_events(job)  # events.jsonl holds both runs
    assert [e["event"] for e in logged].count("started") == 2
    assert [e.get("status") for e in logged if e["event"] == "finished"] == ["cancelled", "completed"]

    # save / load the model (checkpoint + metadata)
    saved = models.save_model(job, tmp_path / "models" / "phantom-mt")
    info = models.load_model_info(saved)
    assert Path(info["checkpoint"]) == saved / "model.pt" and info["method"] == "mean_teacher"
    assert [c["name"] for c in info["classes"]] == ["right ventricle", "myocardium", "left ventricle"]
    assert load_checkpoint(info["checkpoint"])["iteration"] == load_checkpoint(job / "run/best.pt")["iteration"]

    # segment job with the saved model
    from semiseg.data.classes import read_label
    from semiseg.data.io import write_volume
    from semiseg.data.phantom import make_phantom_case
    image, _ = make_phantom_case(2000, seed=0)
    write_volume(tmp_path / "seg/inputs/case.nrrd", image)
    runner = run_job(tmp_path / "seg", {"task": "segment", "model": info["checkpoint"], "inputs": ["inputs/case.nrrd"],
                                        "device": "cpu"})
    result = runner.wait(timeout=120)
    assert result.ok, result.message
    predicted = [e for e in result.events if e["event"] == "predicted"]
    assert len(predicted) == 1 and runner.progress.fraction == 1.0
    pred, classes = read_label(predicted[0]["segmentation"])
    assert pred.shape == image.shape and [c.name for c in classes] == [c["name"] for c in info["classes"]]


def test_bad_job_ends_in_one_error_event(tmp_path):
    runner = run_job(tmp_path, {"task": "train", "config": {**TINY, "method": "no_such_method"}})
    result = runner.wait(timeout=120)
    assert result.status == "failed" and result.exit_code == protocol.EXIT_ERROR
    errors = [e for e in result.events if e["event"] == "error"]
    assert len(errors) == 1 and "unknown method 'no_such_method'" in result.message and "\n" not in result.message
    assert [e["event"] for e in protocol.read_events(tmp_path)] == ["error"]  # the job folder keeps it


@pytest.fixture
def in_process(capsys):
    """``semiseg --json run --job DIR`` in this process (cheap error cases); signal handlers restored."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def run(job: Path) -> tuple[int, list[dict]]:
        code = cli.main(["--json", "run", "--job", str(job)])
        out = capsys.readouterr().out
        return code, protocol.EventParser().feed(out)
    yield run
    for s, h in saved.items():
        signal.signal(s, h)


def test_job_errors_name_the_problem(tmp_path, in_process):
    from semiseg.data.io import write_labelmap, write_volume
    from semiseg.data.volume import Geometry, Volume
    code, events = in_process(tmp_path / "empty")
    assert code == 2 and [e["event"] for e in events] == ["error"] and "no job.json" in events[0]["message"]

    data = tmp_path / "j"
    vol = Volume(np.random.default_rng(0).normal(size=(32, 32, 3)).astype(np.float32), Geometry(spacing=(1, 1, 2)))
    write_volume(data / "data/a.nrrd", vol)
    lab = np.zeros((32, 32, 3), np.uint8)
    lab[4:12, 4:12, 1] = 1
    write_labelmap(data / "data/a.label.nrrd", lab, Geometry(spacing=(1, 1, 2.5)))  # not the image's grid
    classes = [{"value": 1, "name": "tumour", "color": [1, 0, 0]}]
    cfg = {**TINY, "data": str(data / "dataset.csv"), "dim": 2, "iterations": 2, "val_every": 0, "method": "supervised"}
    cfg.pop("labeled")
    protocol.write_job(data, {"task": "train", "config": cfg,
                              "dataset": {"classes": classes, "cases": [{"name": "a", "image": "data/a.nrrd", "split": "train"}]}})
    code, events = in_process(data)
    assert code == 2 and events[-1]["event"] == "error"
    assert events[-1]["message"].startswith("no labeled case for training")

    protocol.write_job(data, {"task": "train", "config": cfg, "dataset": {"classes": classes, "cases": [
        {"name": "a", "image": "data/a.nrrd", "label": "data/a.label.nrrd", "split": "train"}]}})
    code, events = in_process(data)
    assert code == 2 and events[-1]["event"] == "error"
    assert "does not share the grid of image" in events[-1]["message"] and "spacing (1, 1, 2.5)" in events[-1]["message"]


# ------------------------------------------------------------------------------------------ fake trainers
def fake_python(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.skipif(not POSIX, reason="shell-script fake trainers")
def test_crash_without_event_is_explained_from_stderr(tmp_path):
    python = fake_python(tmp_path / "python", 'echo "Traceback (most recent call last):" >&2\n'
                                              'echo "ModuleNotFoundError: No module named \'torch\'" >&2\nexit 1\n')
    result = run_job(tmp_path / "job", {"task": "train", "config": {}}, python=python).wait(timeout=30)
    assert result.status == "failed" and result.exit_code == 1
    assert result.message.startswith("PyTorch is not installed for the Python that runs the trainer")
    assert "No module named 'torch'" in result.details


@pytest.mark.skipif(not POSIX, reason="shell-script fake trainers")
def test_cancel_kills_the_whole_tree_after_the_grace_period(tmp_path):
    """A trainer that ignores CANCEL and has a child (PythonSlicer → python-real): both are killed."""
    python = fake_python(tmp_path / "python", 'sleep 300 &\necho $! > grandchild.pid\n'
                                              'echo \'{"event":"started","iteration":0,"iterations":9}\'\nwait\n')
    logs: list[str] = []
    runner = run_job(tmp_path / "job", {"task": "train", "config": {}}, python=python, on_log=logs.append)
    while not runner.events:
        runner.poll(0.05)
    grandchild = int((tmp_path / "job/grandchild.pid").read_text())
    pid = runner.backend.pid()
    assert pid_alive(grandchild) and grandchild in descendant_pids(pid)
    t0 = time.monotonic()
    runner.cancel(grace_seconds=0.5)
    result = runner.wait(timeout=20)
    assert result.status == "cancelled" and result.killed and time.monotonic() - t0 < 10
    assert not pid_alive(pid) and not pid_alive(grandchild)
    assert any("killing its process tree" in line for line in logs)


def test_kill_process_tree_never_targets_this_process():
    assert kill_process_tree(os.getpid()) == [] and kill_process_tree(0) == []
    env = trainer_environment({"PYTHONPATH": "/elsewhere"}, cpu_only=True)
    paths = env["PYTHONPATH"].split(os.pathsep)
    assert paths[-1] == "/elsewhere" and str(ROOT / "SemiSegTrainer") in paths and env["CUDA_VISIBLE_DEVICES"] == "-1"
    assert json.loads(json.dumps(env["PYTHONUNBUFFERED"])) == "1"
