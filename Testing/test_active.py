"""Uncertainty maps, volume scores, the ranking of `semiseg suggest` and the uncertainty outputs of
`semiseg segment --uncertainty` and of the job protocol (segment and suggest tasks)."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from semiseg import active
from semiseg.active import Candidate, rank_candidates
from semiseg.data.classes import read_label
from semiseg.data.io import read_volume, write_volume
from semiseg.data.volume import Geometry, Volume
from semiseg_trainer import protocol
from semiseg_trainer.cli import main


# ------------------------------------------------------------------------------------------ maths
def test_voxel_maps_hand_values():
    # one voxel each: one-hot, uniform over 4 classes, half/half over two of 4
    probs = np.array([[1, .25, .5], [0, .25, .5], [0, .25, 0], [0, .25, 0]], np.float32)
    assert np.allclose(active.normalized_entropy(probs), [0.0, 1.0, math.log(2) / math.log(4)], atol=1e-6)
    # margin 1 - (p1 - p2): one-hot 0, uniform 1, half/half 1
    assert np.allclose(active.margin_uncertainty(probs), [0.0, 1.0, 1.0])
    p = np.array([[.6], [.3], [.1]], np.float32)
    assert np.allclose(active.margin_uncertainty(p), [0.7])
    q = np.array([[.2], [.5], [.3]], np.float32)
    assert np.allclose(active.disagreement(p, q), [0.5 * (.4 + .2 + .2)])
    assert np.allclose(active.disagreement(p, p), [0.0])


def test_mutual_information_hand_values():
    """BALD over passes, two classes, three voxels: passes certain of opposite classes (mean uniform: 1 − 0 = 1),
    passes equally unsure (1 − 1 = 0, though the entropy is 1), one certain and one 3:1 pass."""
    a = np.array([[1.0, 0.5, 1.0], [0.0, 0.5, 0.0]], np.float32)
    b = np.array([[0.0, 0.5, 0.75], [1.0, 0.5, 0.25]], np.float32)
    def h(p):  # entropy in bits of a two-class distribution (log C = log 2)
        return -sum(x * math.log2(x) for x in p if x > 0)
    expected = [1.0, 0.0, h([0.875, 0.125]) - (0 + h([0.75, 0.25])) / 2]
    assert np.allclose(active.mutual_information([a, b]), expected, atol=1e-6)
    assert np.allclose(active.mutual_information([a, a, a]), 0.0)


def test_volume_score_is_the_mean_over_dilated_foreground_and_uncertain_voxels():
    u = np.full((7, 7, 7), 0.1, np.float32)
    labels = np.zeros((7, 7, 7), np.uint8)
    labels[3, 3, 3] = 1
    u[3, 3, 3] = 0.3
    u[0, 0, 6] = 0.8  # far from the structure but uncertain: counted
    # region: the 3x3x3 block around the foreground voxel (27) + the uncertain voxel
    expect = (26 * 0.1 + 0.3 + 0.8) / 28
    assert active.volume_score(u, labels) == pytest.approx(expect, rel=1e-6)
    # a larger certain background does not change it (the plain mean would drop by half)
    big_u, big_l = np.zeros((14, 7, 7), np.float32), np.zeros((14, 7, 7), np.uint8)
    big_u[:7], big_l[:7] = u, labels
    assert active.volume_score(big_u, big_l) == pytest.approx(expect, rel=1e-6)
    assert big_u.mean() == pytest.approx(u.mean() / 2, rel=1e-6)
    assert active.volume_score(np.zeros((4, 4, 4)), np.zeros((4, 4, 4))) == 0.0


def test_most_uncertain_slice_is_along_the_last_axis():
    u = np.zeros((4, 5, 6), np.float32)
    u[:, :, 4] = 0.5
    u[0, 0, 2] = 1.0  # one voxel: a lower slice mean than slice 4
    assert active.most_uncertain_slice(u) == 4


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def test_ranking_passes_over_near_duplicates_unless_diversity_is_off():
    a, a_dup, b = _unit([1, 0, 0]), _unit([1, 0.05, 0]), _unit([0, 1, 0])  # cos(a, a_dup) = 0.9988
    cands = [Candidate("b", 0.5, 1, b), Candidate("a", 0.9, 2, a), Candidate("a2", 0.8, 3, a_dup)]
    r = rank_candidates(cands, 2, "entropy", diversity=0.05)
    assert [(x["input"], x["picked"]) for x in r] == [("a", True), ("b", True), ("a2", False)]
    assert r[0] == {"input": "a", "score": 0.9, "picked": True, "slice": 2}
    r0 = rank_candidates(cands, 2, "entropy", diversity=0)
    assert [(x["input"], x["picked"]) for x in r0] == [("a", True), ("a2", True), ("b", False)]
    # fewer distinct candidates than n: the near-duplicate fills up
    r3 = rank_candidates(cands, 3, "entropy", diversity=0.05)
    assert [x["input"] for x in r3] == ["a", "b", "a2"] and all(x["picked"] for x in r3)
    # random: the order is the seed's, reproducible, and differs between seeds somewhere
    orders = {s: [x["input"] for x in rank_candidates(cands, 1, "random", seed=s, diversity=0)] for s in range(8)}
    assert orders[3] == [x["input"] for x in rank_candidates(cands, 1, "random", seed=3, diversity=0)]
    assert len({tuple(o) for o in orders.values()}) > 1
    with pytest.raises(Exception, match="unknown strategy 'bald'"):
        rank_candidates(cands, 1, "bald")


def test_thumbnail_cosine_is_one_for_an_intensity_rescaled_copy():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(32, 30, 10)).astype(np.float32)
    t1, t2 = active.thumbnail(img), active.thumbnail(3 * img + 100)
    assert float(t1 @ t2) == pytest.approx(1.0, abs=1e-5)
    assert abs(float(t1 @ active.thumbnail(rng.normal(size=(32, 30, 10))))) < 0.5


# ------------------------------------------------------------------------------------------ trained models
def _train(out, method):
    assert main(["--json", "train", "--data", "phantom:6", "--labeled", "2", "--method", method, "--iterations", "3",
                 "--patch-size", "32", "32", "--labeled-batch", "2", "--unlabeled-batch", "2", "--val-every", "0",
                 "--threads", "1", "--device", "cpu", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("active")
    pool = root / "pool"
    from semiseg.data.phantom import make_phantom_case
    for i in range(3):
        image, _ = make_phantom_case(100 + i, seed=0)
        write_volume(pool / f"case{i}.nrrd", image)
    return {"supervised": _train(root / "sup", "supervised"), "mean_teacher": _train(root / "mt", "mean_teacher"),
            "pool": pool}


def test_segment_uncertainty_map_events_and_csv(models, tmp_path, capsys):
    from semiseg.predict import Segmenter
    pool = models["pool"]
    assert main(["--json", "segment", "--model", str(models["supervised"]), "--input", str(pool), "--out",
                 str(tmp_path), "--uncertainty", "--device", "cpu"]) == 0
    events = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    predicted = [e for e in events if e["event"] == "predicted"]
    assert len(predicted) == 3
    rows = list(csv.DictReader(open(tmp_path / "uncertainty.csv")))
    assert [(r["input"], float(r["score"])) for r in rows] == [(e["input"], e["uncertainty_score"]) for e in predicted]
    e = predicted[0]
    image = read_volume(e["input"])
    umap = read_volume(e["uncertainty"])
    labels, _ = read_label(e["labelmap"])
    assert umap.array.dtype == np.float32 and umap.array.shape == image.array.shape
    assert umap.geometry.matches(image.geometry)
    # the map is the normalised entropy of the model's softmax, computed here from the network directly
    seg = Segmenter(models["supervised"])
    _, probs = seg._probs(seg.net, image.array)
    h = -(np.clip(probs, 1e-12, 1) * np.log(np.clip(probs, 1e-12, 1))).sum(0) / math.log(probs.shape[0])
    assert np.allclose(umap.array, h, atol=1e-5)
    assert e["uncertainty_score"] == pytest.approx(active.volume_score(umap.array, labels.array), abs=1e-6)


def test_uncertainty_of_a_planned_model_is_resampled_back_onto_the_input_grid(tmp_path):
    """A plan grid twice as fine: the map computed there (here: the first array axis' index, a linear ramp)
    comes back on the input's exact grid, linearly interpolated, with no zero border."""
    from semiseg.planning.plan import Plan  # noqa: F401 (the plan is built by make_plan below)
    from semiseg.data.datasets import load_dataset
    from semiseg.planning import fingerprint_splits, make_plan
    from semiseg.predict import Segmenter
    from semiseg.data.io import write_labelmap
    rng = np.random.default_rng(1)
    for i in range(3):
        g = Geometry(spacing=(0.8, 0.8, 0.8), origin=(1.0, 2.0, 3.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
        img = rng.normal(size=(10, 8, 6)).astype(np.float32)
        lab = np.zeros((10, 8, 6), np.uint8)
        lab[3:7, 2:6, 2:4] = 1
        write_volume(tmp_path / f"c{i}.nrrd", Volume(img, g))
        write_labelmap(tmp_path / f"c{i}_label.nrrd", lab, g)
    data = load_dataset(str(tmp_path))
    plan = make_plan(fingerprint_splits(data), "cpu", 1.0, {"target_spacing": (0.4, 0.4, 0.4), "dim": 3})
    seg = Segmenter.__new__(Segmenter)
    seg.meta = {"plan": plan.to_dict(), "dim": 3, "classes": [c.to_dict() for c in data.classes]}
    seg.lcc, seg.stride, seg.device, seg.teacher, seg.net = None, None, torch.device("cpu"), None, None
    seen = {}

    def probs_on_plan_grid(net, image):  # background probability ramps along axis 0 on the plan grid
        seen["shape"] = image.shape
        x = np.arange(image.shape[0], dtype=np.float32)[:, None, None] / (image.shape[0] - 1)
        p1 = np.broadcast_to(0.5 * x, image.shape).astype(np.float32)
        return (p1 > 0.25).astype(np.uint8), np.stack([1 - p1, p1])

    seg._probs = probs_on_plan_grid
    vol = read_volume(tmp_path / "c0.nrrd")
    labels, umap = seg.uncertainty_on_grid(vol)
    assert seen["shape"] == (20, 16, 12)
    assert umap.shape == labels.shape == (10, 8, 6) and umap.dtype == np.float32
    # the map on the plan grid is a smooth function of x; linear resampling back keeps it within its range
    # and monotone along x, and no voxel of the input grid falls outside (no zero border)
    assert (umap > 0).all() and (umap <= 1).all()
    assert (np.diff(umap[:, 4, 3]) > 0).all()


def test_mc_dropout_map_is_the_passes_disagreement_and_reproducible(models):
    """``mc-dropout``: the map equals BALD of 8 passes with the dropout layers on (recomputed here from the
    network with the same seed), is the same on a second call, leaves the network in inference mode and the
    labels the model's own; with every dropout probability set to 0 the passes are identical and the map is
    exactly 0."""
    from semiseg.predict import Segmenter
    seg = Segmenter(models["supervised"])
    vol = read_volume(models["pool"] / "case0.nrrd")
    labels, umap = seg.uncertainty_on_grid(vol, "mc-dropout")
    assert not any(m.training for m in seg.net.modules())
    assert np.array_equal(labels, seg.predict_on_grid(vol))
    assert np.array_equal(umap, seg.uncertainty_on_grid(vol, "mc-dropout")[1])
    dropouts = [m for m in seg.net.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    assert dropouts
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for m in dropouts:
            m.train()
        passes = [seg._probs(seg.net, vol.array)[1] for _ in range(active.MC_PASSES)]
        for m in dropouts:
            m.eval()
    assert np.allclose(umap, active.mutual_information(passes), atol=1e-6)
    assert umap.max() > 0 and umap.shape == vol.array.shape
    for m in dropouts:
        m.p = 0.0
    assert not seg.uncertainty_on_grid(vol, "mc-dropout")[1].any()  # identical passes: exactly 0


def test_suggest_cli_json_and_teacher_disagreement(models, capsys):
    pool = models["pool"]
    assert main(["--json", "suggest", "--model", str(models["mean_teacher"]), "--input", str(pool), "--n", "2",
                 "--strategy", "teacher-disagreement", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["strategy"] == "teacher-disagreement" and len(out["ranking"]) == 3
    assert [r["picked"] for r in out["ranking"]] == [True, True, False]
    scores = [r["score"] for r in out["ranking"]]
    assert scores[0] >= scores[1] and 0 <= min(scores) and max(scores) <= 1
    assert all(0 <= r["slice"] < read_volume(r["input"]).array.shape[-1] for r in out["ranking"])
    # a model without a teacher: one error line naming it
    assert main(["--no-json", "suggest", "--model", str(models["supervised"]), "--input", str(pool),
                 "--strategy", "teacher-disagreement", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("semiseg: error: model ") and "supervised" in err[0] \
        and "no EMA teacher" in err[0]


def test_job_protocol_segment_uncertainty_and_suggest_tasks(models, tmp_path):
    job = tmp_path / "seg"
    protocol.write_job(job, {"task": "segment", "model": str(models["supervised"]), "inputs": [
        str(models["pool"] / "case0.nrrd")], "device": "cpu", "uncertainty": True})
    assert main(["--json", "run", "--job", str(job)]) == 0
    events = protocol.read_events(job)
    pred = [e for e in events if e["event"] == "predicted"][0]
    assert pred["uncertainty"].endswith("case0.uncertainty.nrrd") and 0 < pred["uncertainty_score"] <= 1
    assert (job / "predictions" / "uncertainty.csv").is_file()
    job = tmp_path / "sug"
    protocol.write_job(job, {"task": "suggest", "model": str(models["supervised"]), "device": "cpu",
                             "inputs": [str(models["pool"] / f"case{i}.nrrd") for i in range(3)], "n": 1,
                             "strategy": "entropy"})
    assert main(["--json", "run", "--job", str(job)]) == 0
    events = protocol.read_events(job)
    assert [e["event"] for e in events] == ["started", "suggested", "finished"]
    ranking = events[1]["ranking"]
    assert [r["picked"] for r in ranking] == [True, False, False]
    assert set(ranking[0]) == {"input", "score", "picked", "slice"}
    assert [r["score"] for r in ranking[1:]] == sorted((r["score"] for r in ranking[1:]), reverse=True)


def test_segment_names_its_uncertainty_map_on_the_command_line_and_in_a_job(models, tmp_path, capsys):
    """`segment --uncertainty mc-dropout` and a job's "uncertainty": "margin" write that map (equal to the
    engine's); a job naming an unknown map is one error line naming its job.json, before any work."""
    from semiseg.predict import Segmenter
    case = models["pool"] / "case0.nrrd"
    assert main(["--json", "segment", "--model", str(models["supervised"]), "--input", str(case), "--out",
                 str(tmp_path / "mc"), "--uncertainty", "mc-dropout", "--device", "cpu"]) == 0
    seg = Segmenter(models["supervised"])
    vol = read_volume(case)
    assert np.allclose(read_volume(tmp_path / "mc" / "case0.uncertainty.nrrd").array,
                       seg.uncertainty_on_grid(vol, "mc-dropout")[1], atol=1e-6)
    job = tmp_path / "margin"
    protocol.write_job(job, {"task": "segment", "model": str(models["supervised"]), "inputs": [str(case)],
                             "device": "cpu", "uncertainty": "margin"})
    assert main(["--json", "run", "--job", str(job)]) == 0
    assert np.allclose(read_volume(job / "predictions" / "case0.uncertainty.nrrd").array,
                       seg.uncertainty_on_grid(vol, "margin")[1], atol=1e-6)
    job = tmp_path / "bad"
    protocol.write_job(job, {"task": "segment", "model": str(models["supervised"]), "inputs": [str(case)],
                             "device": "cpu", "uncertainty": "variance"})
    capsys.readouterr()
    assert main(["--no-json", "run", "--job", str(job)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "job.json" in err[0] and "unknown uncertainty map 'variance'" in err[0]
    assert not (job / "predictions").exists()
