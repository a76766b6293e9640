"""The loop's checkpoint-selection fallback (``val`` without a validation case selects the final model and
config.json records ``final``) is one rule, applied by the loop and accepted by both checks that compare a
run folder's config.json with what is asked now: ``--resume`` and the benchmark's run-folder check. Neither
check lets the rule hide another difference."""
import json

import pytest

from semiseg.benchmark.grid import RunSpec, run_state
from semiseg.config import resolve_config, selection_fallback
from semiseg.errors import SemiSegError
from semiseg.run import resumed_explicit

ASKED = {"data": "phantom", "method": "mean_teacher", "selection": "val", "val_every": 5, "iterations": 10}


def _run_folder(folder, has_validation: bool, **changes):
    """A finished run folder as the loop leaves it: config.json with the selection it used."""
    cfg = resolve_config({**ASKED, **changes})
    cfg.selection = selection_fallback(cfg.selection, has_validation)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    (folder / "metrics.json").write_text("{}")
    return folder


def test_val_without_validation_cases_selects_the_final_model():
    assert selection_fallback("val", has_validation=False) == "final"
    assert [selection_fallback(s, has_validation=True) for s in ("val", "final", "test")] == ["val", "final", "test"]
    assert [selection_fallback(s, has_validation=False) for s in ("final", "test")] == ["final", "test"]


def test_resume_accepts_the_fallback(tmp_path):
    run = _run_folder(tmp_path / "run", has_validation=False)
    assert json.loads((run / "config.json").read_text())["selection"] == "final"
    assert resumed_explicit(ASKED, None, run)["lr"] == resolve_config(ASKED).lr


def test_resume_still_refuses_other_differences(tmp_path):
    run = _run_folder(tmp_path / "run", has_validation=False)
    with pytest.raises(SemiSegError, match="lr"):
        resumed_explicit({**ASKED, "lr": 0.5}, None, run)
    # a run that did validate (recorded val) asked now for the final model: a real difference
    validated = _run_folder(tmp_path / "validated", has_validation=True)
    with pytest.raises(SemiSegError, match="selection"):
        resumed_explicit({**ASKED, "selection": "final"}, None, validated)


def test_the_benchmark_accepts_the_fallback_and_refuses_other_differences(tmp_path):
    run = _run_folder(tmp_path / "runs" / "mean_teacher-L1-s1", has_validation=False)
    assert run_state(RunSpec("mean_teacher", 1, 1, run, dict(ASKED))) == "done"
    with pytest.raises(SemiSegError, match="lr"):
        run_state(RunSpec("mean_teacher", 1, 1, run, {**ASKED, "lr": 0.5}))
    validated = _run_folder(tmp_path / "runs" / "validated", has_validation=True)
    with pytest.raises(SemiSegError, match="selection"):
        run_state(RunSpec("mean_teacher", 1, 1, validated, {**ASKED, "selection": "final"}))
