"""The training loop end to end: exact resume, cancellation, the phantom train → segment → evaluate
path through the real `semiseg` process, and the promised one-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from semiseg.checkpoint import load_checkpoint
from semiseg.config import resolve_config
from semiseg.run import load_run_data
from semiseg.errors import CancelledError, SemiSegError
from semiseg.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = {"data": "phantom:6", "labeled": 2, "patch_size": (32, 32), "labeled_batch": 2, "unlabeled_batch": 2,
        "iterations": 8, "checkpoint_every": 4, "val_every": 0, "log_every": 2, "deterministic": True,
        "device": "cpu", "threads": 1}


def semiseg(*args, cwd=None, check=True):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "SemiSegLib"), str(ROOT / "SemiSegTrainer")]))
    p = subprocess.run([sys.executable, "-m", "semiseg_trainer", *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=cwd, timeout=3600)
    if check and p.returncode != 0:
        raise AssertionError(f"semiseg {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


@pytest.mark.parametrize("method", ["mean_teacher", "ua_mt"])
def test_resume_equals_uninterrupted_training(tmp_path, method):
    cfg = dict(TINY, method=method)
    if method == "ua_mt":
        cfg["method_options"] = {"mc_passes": 2}
    run_cfg = resolve_config(cfg)
    Trainer(run_cfg, tmp_path / "a", load_run_data(run_cfg)).run()
    stop_at = {"n": 0}

    def stop():  # cancel at the start of iteration 5 (after 5 polls)
        stop_at["n"] += 1
        return stop_at["n"] == 6

    with pytest.raises(CancelledError):
        run_cfg = resolve_config(cfg)
        Trainer(run_cfg, tmp_path / "b", load_run_data(run_cfg), should_stop=stop).run()
    assert load_checkpoint(tmp_path / "b" / "last.pt")["training"]["step"] == 5
    run_cfg = resolve_config(cfg)
    Trainer(run_cfg, tmp_path / "b", load_run_data(run_cfg)).run(resume=True)
    a = load_checkpoint(tmp_path / "a" / "last.pt")["training"]["method"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["training"]["method"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # student, teacher, BN statistics: bit for bit
    events = [json.loads(line) for line in (tmp_path / "b" / "progress.jsonl").read_text().splitlines()]
    assert [e["status"] for e in events if e["event"] == "finished"] == ["cancelled", "completed"]


def test_checkpoint_holds_what_segmentation_needs(tmp_path):
    run_cfg = resolve_config(dict(TINY, method="supervised"))
    Trainer(run_cfg, tmp_path, load_run_data(run_cfg)).run()
    ck = load_checkpoint(tmp_path / "best.pt")
    assert ck["network"]["name"] == "unet" and "training" not in ck
    assert [c["name"] for c in ck["meta"]["classes"]] == ["right ventricle", "myocardium", "left ventricle"]
    assert ck["meta"]["normalization"] == "zscore" and ck["meta"]["patch_size"] == [32, 32]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_phantom_end_to_end_through_the_command_line(tmp_path):
    run = tmp_path / "run"
    semiseg("train", "--data", "phantom:8", "--labeled", "2", "--method", "mean_teacher", "--iterations", "150",
            "--patch-size", "48", "48", "--labeled-batch", "4", "--unlabeled-batch", "4", "--val-every", "50",
            "--rampup-iterations", "60", "--consistency-delay", "20", "--device", "cpu", "--out", run,
            "--upsampling", "transpose")  # the network this 150-iteration budget was sized for (bilinear: 0.44)
    for name in ("config.json", "best.pt", "last.pt", "progress.jsonl", "metrics.json"):
        assert (run / name).is_file(), name
    events = [json.loads(line) for line in (run / "progress.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "started" and events[-1]["event"] == "finished"
    its = [e for e in events if e["event"] == "iteration"]
    assert {"loss", "sup", "consistency", "lr", "it_per_s", "eta_s"} <= set(its[-1])
    assert len([e for e in events if e["event"] == "validation"]) == 3

    from semiseg.data.datasets import load_phantom
    from semiseg.data.classes import read_label
    from semiseg.data.io import write_volume
    data = load_phantom(8, 2)
    for ref in data.test[:2]:
        write_volume(tmp_path / "in" / f"{ref.name}.nrrd", ref.image())
    semiseg("segment", "--model", run, "--input", tmp_path / "in", "--out", tmp_path / "pred", "--device", "cpu")
    dices, trivial = [], []
    for ref in data.test[:2]:
        truth = ref.label()
        pred, classes = read_label(tmp_path / "pred" / f"{ref.name}.seg.nrrd")
        assert [c.name for c in classes] == ["right ventricle", "myocardium", "left ventricle"]
        assert pred.geometry.matches(truth.geometry)  # written on the input's grid
        lab, _ = read_label(tmp_path / "pred" / f"{ref.name}.label.nrrd")
        assert np.array_equal(lab.array, pred.array)
        for v in (1, 2, 3):
            p, t = pred.array == v, truth.array == v
            dices.append(2 * (p & t).sum() / (p.sum() + t.sum()))
            trivial.append(2 * t.sum() / (t.size + t.sum()))  # the class everywhere
    assert np.mean(dices) > 0.6 and np.mean(dices) > 5 * np.mean(trivial), (dices, trivial)

    p = semiseg("evaluate", "--model", run / "best.pt", "--data", "phantom:8", "--split", "test", "--device", "cpu",
                "--out", tmp_path / "eval")
    summary = json.loads((tmp_path / "eval" / "evaluate_test.json").read_text())
    assert summary["cases"] == 4 and set(summary["mean"]) >= {"dice", "jaccard", "hd95", "asd", "hd95_mm", "asd_mm"}
    assert (tmp_path / "eval" / "evaluate_test.csv").read_text().count("\n") == 1 + 4 * 3


def test_cancel_file_stops_training_with_a_valid_checkpoint(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "CANCEL").touch()
    p = semiseg("train", "--data", "phantom:6", "--labeled", "2", "--iterations", "50", "--patch-size", "32", "32",
                "--device", "cpu", "--out", out, check=False)
    assert p.returncode == 3, p.stderr
    ck = load_checkpoint(out / "last.pt")
    assert ck["training"]["step"] == 0
    (out / "CANCEL").unlink()


@pytest.mark.parametrize("args,expected", [
    (["train", "--data", "/nonexistent/folder", "--out", "{tmp}/r"], "dataset not found: '/nonexistent/folder'"),
    (["train", "--method", "nope", "--out", "{tmp}/r"], "unknown method 'nope'"),
    (["train", "--device", "cuda", "--iterations", "2", "--out", "{tmp}/r"], "CUDA is not available"),
    (["train", "--data", "{tmp}/unlabeled_only", "--out", "{tmp}/r"], "no labeled case"),
    (["train", "--patch-size", "100", "100", "--out", "{tmp}/r"], "must be a multiple of 16"),
    (["train", "--patch-size", "96", "64", "--out", "{tmp}/r"], "must be square"),
    (["train", "--data", "acdc:{tmp}", "--out", "{tmp}/r"], "is not an ACDC folder"),
    (["segment", "--model", "{tmp}/missing.pt", "--input", "{tmp}", "--out", "{tmp}/o"], "model checkpoint not found"),
    (["train", "--config", "{tmp}/bad.yaml", "--out", "{tmp}/r"], "cannot parse config file"),
])
def test_bad_input_gives_one_clear_line(tmp_path, args, expected):
    if torch.cuda.is_available() and "cuda" in args:
        pytest.skip("a GPU is present")
    (tmp_path / "bad.yaml").write_text("iterations: [1, 2\n")
    from semiseg.data.io import write_volume
    from semiseg.data.phantom import make_phantom_case
    write_volume(tmp_path / "unlabeled_only" / "scan.nrrd", make_phantom_case(0)[0])
    p = semiseg(*[a.replace("{tmp}", str(tmp_path)) for a in args], check=False)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("semiseg: error: ") and expected in lines[0], p.stderr


def test_folder_dataset_geometry_mismatch_names_both_files(tmp_path):
    from semiseg.data.datasets import load_phantom
    from semiseg.data.io import write_volume
    from semiseg.data.segfile import write_segmentation
    from semiseg.data.volume import Geometry, Volume
    d = load_phantom(4, 2)
    for ref in d.labeled:
        img, lab = ref.image(), ref.label()
        write_volume(tmp_path / f"{ref.name}.nrrd", img)
        g = lab.geometry
        if ref.name.endswith("1"):  # second case: label on a shifted grid
            g = Geometry(g.spacing, tuple(o + 3 for o in g.origin), g.direction)
        write_segmentation(tmp_path / f"{ref.name}.seg.nrrd", lab.array, g, d.classes)
    with pytest.raises(SemiSegError, match=r"phantom_001\.seg\.nrrd.*phantom_001\.nrrd|phantom_001\.nrrd.*phantom_001\.seg\.nrrd"):
        run_cfg = resolve_config(dict(TINY, data=str(tmp_path), dim=2, labeled=2, method="supervised",
                                    preset="phantom"))
        Trainer(run_cfg, tmp_path / "run", load_run_data(run_cfg)).run()


def test_nan_image_is_rejected_with_its_name(tmp_path):
    from semiseg.data.datasets import load_phantom
    d = load_phantom(4, 2)
    bad = d.labeled[1]
    orig = bad.image_loader

    def nan_image():
        v = orig()
        v.array[3, 3, 3] = np.nan
        return v
    bad.image_loader = nan_image
    with pytest.raises(SemiSegError, match="phantom_001.*NaN"):
        Trainer(resolve_config(dict(TINY, data="phantom:4", method="supervised")), tmp_path, data=d).run()
