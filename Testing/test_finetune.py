"""Warm start (`semiseg train --init-from RUN`): the new run starts from the source model (its first loss is
the source model's loss on the same batch, computed here independently), the finetune schedule, what it
records, and the one-line refusals (other classes, its own folder, nothing new)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from semiseg.checkpoint import load_checkpoint
from semiseg.data.pipeline import BatchSource
from semiseg.methods import MethodContext, get_method
from semiseg.networks import build_network
from semiseg.run import prepare_run
from semiseg.train.device import seed_everything
from semiseg_trainer.cli import main

COMMON = ["--data", "phantom:6", "--patch-size", "32", "32", "--labeled-batch", "2", "--unlabeled-batch", "2",
          "--val-every", "0", "--threads", "1", "--device", "cpu", "--deterministic", "--precision", "fp32",
          "--no-channels-last", "--log-every", "1"]


def _train(out, *args):
    assert main(["--json", "train", *COMMON, "--out", str(out), *args]) == 0
    return [json.loads(x) for x in (out / "progress.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    out = {}
    for method in ("supervised", "mean_teacher"):
        _train(root / method, "--method", method, "--labeled", "2", "--iterations", "8",
               "--consistency-delay", "0", "--rampup-iterations", "0") if method == "mean_teacher" else \
            _train(root / method, "--method", method, "--labeled", "2", "--iterations", "8")
        out[method] = root / method
    return out


def reference_first_loss(source_dir, explicit: dict) -> float:
    """The source checkpoint's weights (and EMA teacher) in a fresh network/method, ``losses`` on the first
    batch a run with ``explicit`` draws (same seed, same random-number order as a run's set-up)."""
    ckpt = load_checkpoint(source_dir / "best.pt")
    cfg, data, _ = prepare_run(explicit)
    seed_everything(cfg.seed, True)
    spec = dict(ckpt["network"])
    net = build_network(spec.pop("name"), **spec)  # draws its initial weights, as a run does, then overwritten
    net.load_state_dict(ckpt["model"])
    cls = get_method(cfg.method)
    method = cls(net, cls.Options(**cfg.method_options),
                 MethodContext(dim=cfg.dim, num_classes=len(data.classes) + 1, iterations=cfg.iterations,
                               preset=cfg.preset))
    if cls.uses_teacher:
        teacher = copy.deepcopy(net)  # a copy draws no random numbers (a second build_network would)
        teacher.load_state_dict(ckpt["teacher"])
        method.teacher = teacher
    method.train()
    source = BatchSource(data.labeled, data.unlabeled if cls.uses_unlabeled else [], cfg.dim, tuple(cfg.patch_size),
                         data.normalization, cfg.labeled_batch, cfg.unlabeled_batch if cls.uses_unlabeled else 0,
                         cfg.seed, torch.device("cpu"), cls.extra_unlabeled_streams, data_on_device="off")
    try:
        with torch.no_grad():
            return float(method.losses(source.next(), 0)["loss"])
    finally:
        source.close()


@pytest.mark.parametrize("method", ["supervised", "mean_teacher"])
def test_warm_start_first_loss_is_the_source_models_loss_on_the_same_batch(method, sources, tmp_path):
    src = sources[method]
    warm = _train(tmp_path / "v2", "--init-from", str(src), "--labeled", "3")
    scratch = _train(tmp_path / "scratch", "--method", method, "--labeled", "3", "--iterations", "2")
    first_warm = next(e for e in warm if e["event"] == "iteration")
    first_scratch = next(e for e in scratch if e["event"] == "iteration")
    assert first_warm["iteration"] == 1 == first_scratch["iteration"]
    explicit = {"data": "phantom:6", "labeled": 3, "method": method, "patch_size": (32, 32), "labeled_batch": 2,
                "unlabeled_batch": 2, "iterations": 2, "precision": "fp32", "channels_last": False,
                "deterministic": True, "method_options": {"consistency_delay": 0, "rampup_iterations": 0}
                if method == "mean_teacher" else {}}
    ref = reference_first_loss(src, explicit)
    assert first_warm["loss"] == pytest.approx(ref, abs=2e-6)
    assert abs(first_scratch["loss"] - ref) > 1e-3  # a fresh network's loss is another number
    # finetune schedule: a quarter of the source's 8 iterations; ramps off; what the run records
    cfg = json.loads((tmp_path / "v2" / "config.json").read_text())
    assert cfg["iterations"] == 2 and cfg["init_from"] == str(src) and cfg["method"] == method
    if method == "mean_teacher":
        assert cfg["method_options"]["rampup_iterations"] == 0 and cfg["method_options"]["consistency_delay"] == 0
    metrics = json.loads((tmp_path / "v2" / "metrics.json").read_text())
    assert metrics["labeled_cases"] == 3 and metrics["warm_start"]["source_labeled_cases"] == 2
    assert metrics["warm_start"]["teacher"] == ("loaded EMA teacher" if method == "mean_teacher" else "none")
    meta = load_checkpoint(tmp_path / "v2" / "best.pt")["meta"]
    assert meta["labeled_cases"] == ["phantom_000", "phantom_001", "phantom_002"]
    assert (src / "best.pt").is_file() and load_checkpoint(src / "best.pt")["iteration"] == 8  # source untouched


def test_mean_teacher_from_a_supervised_model_starts_its_teacher_as_the_student(sources, tmp_path):
    _train(tmp_path / "v2", "--init-from", str(sources["supervised"]), "--method", "mean_teacher", "--labeled", "3",
           "--iterations", "1")
    metrics = json.loads((tmp_path / "v2" / "metrics.json").read_text())
    assert metrics["warm_start"]["teacher"] == "copy of the loaded student"


def _error(capsys, *args) -> str:
    assert main(["--no-json", "train", *COMMON, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("semiseg: error: ")
    return err[0]


def test_bad_warm_starts_are_one_line(sources, tmp_path, capsys):
    src = sources["supervised"]
    line = _error(capsys, "--init-from", str(src), "--labeled", "2", "--out", str(tmp_path / "same"))
    assert "nothing new" in line and "2 labeled case(s)" in line
    line = _error(capsys, "--init-from", str(src), "--labeled", "3", "--out", str(src))
    assert "never overwrites the model it starts from" in line
    assert load_checkpoint(src / "best.pt")["iteration"] == 8
    line = _error(capsys, "--init-from", str(src), "--data", "phantom_ct:3", "--labeled", "2", "--dim", "2",
                  "--out", str(tmp_path / "ct"))
    assert "right ventricle" in line and "liver" in line  # both class lists named
    line = _error(capsys, "--init-from", str(tmp_path / "nowhere"), "--labeled", "3", "--out", str(tmp_path / "x"))
    assert "model checkpoint not found" in line


def test_loop_sim_reveals_the_picks_and_chains_the_versions(tmp_path):
    """Each round's warm run starts from the previous round's model and adds exactly the suggested volumes;
    the scratch arm trains the same labeled set for the chain's total iterations."""
    from semiseg.loop_sim import simulate
    common = {"patch_size": (32, 32), "labeled_batch": 2, "unlabeled_batch": 2, "val_every": 2, "threads": 1,
              "device": "cpu", "method": "supervised"}
    rows = simulate("phantom:5", "entropy", 3, 2, 1, 4, 2, tmp_path, common)
    assert [r["labeled"] for r in rows] == [1, 2, 3] and [r["iterations"] for r in rows] == [4, 6, 8]
    seen = {"phantom_000"}
    for k, r in enumerate(rows[1:], 1):
        assert len(r["picked"]) == 1 and r["picked"][0] not in seen
        seen |= set(r["picked"])
        cfg = json.loads((tmp_path / f"round{k}" / "config.json").read_text())
        assert cfg["init_from"] == str(tmp_path / f"round{k - 1}") and cfg["iterations"] == 2
        assert load_checkpoint(tmp_path / f"round{k}" / "best.pt")["meta"]["labeled_cases"] == sorted(seen)
        assert json.loads((tmp_path / f"round{k}_scratch" / "config.json").read_text())["iterations"] == 4 + 2 * k
        assert 0 <= r["dice_warm"] <= 1 and 0 <= r["dice_scratch"] <= 1


def _small_acdc(root, frames: dict[str, int], shape=(20, 24)):
    """A folder in the SSL4MIS ACDC layout: per frame, its slices under data/slices/ (listed out of slice order,
    as train_slices.list is), two validation volumes; every pixel of slice k of frame f holds 10 * f + k."""
    import h5py
    import numpy as np
    (root / "data" / "slices").mkdir(parents=True)
    names = []
    rng = np.random.default_rng(0)
    for f, (frame, depth) in enumerate(frames.items()):
        for k in rng.permutation(depth):
            image = np.full(shape, 10.0 * f + k, np.float32)
            label = np.zeros(shape, np.uint8)
            label[4:12, 5:15] = 1 + k % 3
            with h5py.File(root / "data" / "slices" / f"{frame}_slice_{k}.h5", "w") as h:
                h["image"], h["label"] = image, label
            names.append(f"{frame}_slice_{k}")
    (root / "train_slices.list").write_text("\n".join(names) + "\n")
    for v in ("patient090_frame01", "patient091_frame01"):
        with h5py.File(root / "data" / f"{v}.h5", "w") as h:
            h["image"] = rng.normal(size=(3, *shape)).astype(np.float32)
            h["label"] = np.pad(np.ones((3, 8, 10), np.uint8), ((0, 0), (4, shape[0] - 12), (5, shape[1] - 15)))
    (root / "val.list").write_text("patient090_frame01\npatient091_frame01\n")
    return root


def test_acdc_slices_are_revealed_as_whole_scans(tmp_path):
    """On ACDC the loop's unit is a scan (a patient frame): its slices are scored together as one volume
    stacked in slice order, and revealing it labels all its slices at once."""
    import numpy as np
    from semiseg.data.datasets import load_dataset
    from semiseg.loop_sim import _scan_image, _scans, simulate
    frames = {"patient001_frame01": 3, "patient001_frame12": 4, "patient002_frame01": 2, "patient003_frame01": 3}
    data = f"acdc:{_small_acdc(tmp_path / 'acdc', frames)}"
    scans = _scans(load_dataset(data, 99))
    assert {k: len(v) for k, v in scans.items()} == frames  # grouped, in the list's order
    stacked = _scan_image(scans["patient001_frame12"])()
    assert stacked.name == "patient001_frame12" and stacked.array.shape == (24, 20, 4)  # (x, y, z)
    assert [float(stacked.array[0, 0, z]) for z in range(4)] == [10.0, 11.0, 12.0, 13.0]  # slice order

    common = {"patch_size": (16, 16), "labeled_batch": 2, "unlabeled_batch": 2, "val_every": 2, "threads": 1,
              "device": "cpu", "method": "mean_teacher",
              "method_options": {"consistency_delay": 3, "rampup_iterations": 5}}
    rows = simulate(data, "entropy", 0, 2, 1, 4, 2, tmp_path / "sim", common)
    assert rows[0]["labeled"] == 1 and all(len(r["picked"]) == 1 and r["picked"][0] in frames for r in rows[1:])
    revealed = ["patient001_frame01"] + [r["picked"][0] for r in rows[1:]]
    labeled = load_checkpoint(tmp_path / "sim" / "round2" / "best.pt")["meta"]["labeled_cases"]
    assert sorted(labeled) == sorted(f"{f}_slice_{k}" for f in revealed for k in range(frames[f]))
    # the given ramps apply to the runs from scratch; a warm round starts past them (the finetune schedule)
    options = {d: json.loads((tmp_path / "sim" / d / "config.json").read_text())["method_options"]
               for d in ("round0", "round1", "round1_scratch")}
    assert (options["round0"]["consistency_delay"], options["round0"]["rampup_iterations"]) == (3, 5)
    assert (options["round1_scratch"]["consistency_delay"], options["round1_scratch"]["rampup_iterations"]) == (3, 5)
    assert (options["round1"]["consistency_delay"], options["round1"]["rampup_iterations"]) == (0, 0)
    assert np.isfinite(rows[-1]["dice_warm"])


def _case_list_job(root, src, cases_dir, shifted: bool):
    """A Slicer-style train job: a case list (corrected segmentations as labelmaps) and init_from."""
    from semiseg.data.io import write_labelmap, write_volume
    from semiseg.data.phantom import PHANTOM_CLASSES, make_phantom_case
    from semiseg.data.volume import Geometry
    from semiseg_trainer import protocol
    cases = []
    for i in range(3):
        image, label = make_phantom_case(i, seed=0)
        write_volume(cases_dir / f"c{i}.nrrd", image)
        g = label.geometry
        if shifted and i == 2:  # the corrected segmentation sits on another grid than its volume
            g = Geometry(g.spacing, tuple(o + 5.0 for o in g.origin), g.direction)
        write_labelmap(cases_dir / f"c{i}_seg.nrrd", label.array, g)
        cases.append({"name": f"c{i}", "image": str(cases_dir / f"c{i}.nrrd"),
                      "label": str(cases_dir / f"c{i}_seg.nrrd"), "split": "train"})
    protocol.write_job(root, {"task": "train", "config": {
        "init_from": str(src), "iterations": 1, "threads": 1, "device": "cpu", "val_every": 0,
        "cache_dir": str(root / "cache")},
        "dataset": {"classes": [c.to_dict() for c in PHANTOM_CLASSES], "cases": cases}})
    return root


def test_retrain_job_from_a_case_list_and_a_segmentation_on_another_grid(sources, tmp_path):
    from semiseg_trainer import protocol
    cases = tmp_path / "cases"
    cases.mkdir()
    job = _case_list_job(tmp_path / "ok", sources["supervised"], cases, shifted=False)
    assert main(["--json", "run", "--job", str(job)]) == 0
    started = next(e for e in protocol.read_events(job) if e["event"] == "started")
    assert started["warm_start"]["init_from"] == str(sources["supervised"] / "best.pt")
    assert json.loads((job / "run" / "metrics.json").read_text())["labeled_cases"] == 3
    job = _case_list_job(tmp_path / "bad", sources["supervised"], cases, shifted=True)
    assert main(["--json", "run", "--job", str(job)]) == 2
    errors = [e for e in protocol.read_events(job) if e["event"] == "error"]
    assert len(errors) == 1 and "c2_seg.nrrd does not share the grid of image" in errors[0]["message"]
