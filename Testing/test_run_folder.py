"""Assembling a run (semiseg.run.prepare_run) through the command line: a run folder has one owner,
``--resume`` continues the run's own configuration, and the data checks that stop or warn before
training (images that are not single-component volumes, a class found in one labeled case only)."""
import io
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from semiseg.data.io import write_labelmap, write_volume
from semiseg.data.volume import Geometry, Volume
from semiseg_trainer.cli import main

TINY = ["--data", "phantom:4", "--labeled", "2", "--method", "supervised", "--patch-size", "32", "32",
        "--labeled-batch", "2", "--val-every", "0", "--log-every", "1", "--device", "cpu", "--threads", "1",
        "--deterministic"]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [str(Path(__file__).resolve().parents[1] / d) for d in ("SemiSegLib", "SemiSegTrainer")]
    + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


def run_cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(["--json", *map(str, args)])
    return rc, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------ one process owns a run folder
def test_second_train_on_the_same_folder_refuses_naming_the_owner(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "semiseg_trainer", "--json", "train", *TINY,
                              "--iterations", "100000", "--out", str(run)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        for line in first.stdout:  # wait until the first run trains
            if '"iteration"' in line:
                break
        rc, _, err = run_cli("train", *TINY, "--iterations", "2", "--out", run)
        assert rc == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("semiseg: error: ")
        assert f"process {first.pid}" in lines[0] and socket.gethostname() in lines[0] and str(run) in lines[0]
    finally:
        first.terminate()
        first.wait(timeout=60)
    assert first.returncode == 3  # the owner was not disturbed: it stopped on request, checkpoint written
    assert not (run / ".semiseg.lock").exists()  # and gave the folder back


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    run = tmp_path / "run"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run.mkdir()
    (run / ".semiseg.lock").write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "time": 0}))
    rc, _, err = run_cli("train", *TINY, "--iterations", "2", "--out", run)
    assert rc == 0, err
    assert (run / "metrics.json").is_file() and not (run / ".semiseg.lock").exists()


# ------------------------------------------------------------------ --resume reads the run's config.json
def _cancelled_run(run: Path) -> dict:
    """A run cancelled at iteration 0 (a CANCEL file), with a configuration far from the defaults."""
    run.mkdir()
    (run / "CANCEL").touch()
    rc, _, _ = run_cli("train", *TINY, "--iterations", "3", "--lr", "0.02", "--out", run)
    assert rc == 3
    (run / "CANCEL").unlink()
    return json.loads((run / "config.json").read_text())


def test_resume_without_arguments_continues_the_runs_own_configuration(tmp_path):
    run = tmp_path / "run"
    before = _cancelled_run(run)
    rc, out, err = run_cli("train", "--resume", "--out", run)
    assert rc == 0, err
    after = json.loads((run / "config.json").read_text())
    assert after == before
    started = [json.loads(l) for l in out.splitlines() if '"started"' in l]
    assert started[-1]["iteration"] == 0 and started[-1]["method"] == "supervised"
    assert json.loads((run / "metrics.json").read_text())["iterations"] == 3


def test_resume_with_a_contradicting_argument_is_one_error_line(tmp_path):
    run = tmp_path / "run"
    _cancelled_run(run)
    rc, _, err = run_cli("train", "--resume", "--out", run, "--patch-size", "64", "64", "--threads", "1")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("semiseg: error: ")
    assert "patch_size" in lines[0] and "[32, 32]" in lines[0] and "[64, 64]" in lines[0]
    assert "threads" not in lines[0]  # runtime settings may change on resume


# ------------------------------------------------------------------ images of the pool
GEOM = Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0))


def _labeled_folder(d: Path, n: int = 2, values=(1, 1, 1)) -> None:
    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_volume(d / f"case{i}.nrrd", Volume(rng.normal(0, 1, (16, 16, 8)).astype(np.float32), GEOM))
        lab = np.zeros((16, 16, 8), np.uint8)
        lab[4:10, 4:10, 2:6] = values[i]
        write_labelmap(d / f"case{i}_label.nrrd", lab, GEOM)


@pytest.mark.parametrize("kind", ["2d", "vector"])
def test_a_2d_or_vector_image_in_a_3d_pool_is_one_line_naming_it(tmp_path, kind):
    import SimpleITK as sitk
    d = tmp_path / "data"
    _labeled_folder(d)
    odd = d / "odd.nrrd"
    if kind == "2d":
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 16), np.float32)), str(odd))
    else:
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 16, 16, 3), np.float32), isVector=True), str(odd))
    rc, _, err = run_cli("train", "--data", d, "--method", "mean_teacher", "--iterations", "1", "--device", "cpu",
                         "--threads", "1", "--out", tmp_path / "run")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("semiseg: error: ") and str(odd) in lines[0]
    assert ("2D" in lines[0]) if kind == "2d" else ("3 components" in lines[0])
    assert not (tmp_path / "run" / "last.pt").exists()


# ------------------------------------------------------------------ a class in one labeled case only
def test_a_label_value_used_in_one_case_only_is_one_warning_with_the_coverage(tmp_path):
    d = tmp_path / "data"
    _labeled_folder(d, n=3, values=(1, 255, 1))
    rc, _, err = run_cli("plan", d, "--out", tmp_path / "plan.json", "--device", "cpu")
    assert rc == 0, err
    warnings = [l for l in err.splitlines() if l.startswith("semiseg: warning: ")]
    assert len(warnings) == 1, err
    w = warnings[0]
    assert "class_255" in w and "1 of 3" in w and "case1_label.nrrd" in w and "class_1: 2 of 3" in w
    # every class in every labeled case: no warning
    d2 = tmp_path / "same"
    _labeled_folder(d2, n=3, values=(1, 1, 1))
    rc, _, err = run_cli("plan", d2, "--out", tmp_path / "plan2.json", "--device", "cpu")
    assert rc == 0 and "warning" not in err
