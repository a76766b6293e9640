"""The labeling loop's scene side on real MRML outside Slicer (slicer-core): uncertainty maps loaded onto their
volume's grid with their colour table, a ranked volume's most uncertain slice as a point to jump to, a
corrected segmentation checked and named as the model's classes, and model versions that never overwrite."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer_core", reason="real MRML needs the slicer-core wheel (pip install slicer-core==5.12.4.0)")
slicer = pytest.importorskip("slicer", reason="slicer-core's 'slicer' package is not importable")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SemiSegExtension"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from SemiSegSlicerLib import labeling, models  # noqa: E402
from SemiSegSlicerLib import mrml_export as ex  # noqa: E402
from SemiSegSlicerLib import segment_classes as sc  # noqa: E402
from SemiSegSlicerLib import mrml_import as im  # noqa: E402
from semiseg.data.io import read_volume, write_volume  # noqa: E402
from semiseg.predict import Segmenter  # noqa: E402
from semiseg_trainer import protocol  # noqa: E402
from test_slicer_mrml import GEOM_A, GEOM_B, RED, add_segmentation, add_volume, matrix  # noqa: E402

CLASSES = [{"value": 1, "name": "liver", "color": list(RED)}, {"value": 2, "name": "spleen", "color": [0.1, 0.8, 0.2]}]


@pytest.fixture
def scene():
    im.ensure_converter_rules()
    return slicer.vtkMRMLScene()


def test_uncertainty_map_loads_on_its_volume_grid_with_its_colours(scene, tmp_path):
    volume = add_volume(scene, "Oblique", np.zeros((3, 5, 6), np.int16), GEOM_A)
    (stem,) = ex.export_segment_inputs(tmp_path, [volume])
    grid = read_volume(tmp_path / "inputs" / f"{stem}.nrrd")
    values = np.random.default_rng(0).random(grid.shape).astype(np.float32)
    write_volume(tmp_path / f"{stem}.uncertainty.nrrd", type(grid)(values, grid.geometry))
    node = labeling.import_uncertainty(scene, tmp_path / f"{stem}.uncertainty.nrrd", volume)
    assert node.GetName() == "Oblique SemiSeg uncertainty"
    np.testing.assert_allclose(ex.world_ijk_to_ras(node), ex.world_ijk_to_ras(volume), atol=1e-5)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), values.transpose(2, 1, 0))
    display = node.GetDisplayNode()
    table = scene.GetNodeByID(display.GetColorNodeID())
    assert table.GetName() == labeling.UNCERTAINTY_COLORS and table.GetNumberOfColors() == 256
    assert (display.GetWindow(), display.GetLevel()) == pytest.approx((1.0, 0.5))
    assert labeling.uncertainty_color_table(scene) is table  # one table per scene
    other = add_volume(scene, "Elsewhere", np.zeros((3, 5, 6), np.int16), GEOM_B)
    with pytest.raises(im.ImportError_, match="does not lie on the grid of 'Elsewhere'"):
        labeling.import_uncertainty(scene, tmp_path / f"{stem}.uncertainty.nrrd", other)


def test_ranking_of_a_suggest_job_points_at_each_volumes_most_uncertain_slice(scene, tmp_path):
    a = add_volume(scene, "A", np.zeros((4, 5, 6), np.int16), matrix((0.5, 0.5, 2.0), (10.0, 20.0, 30.0)))
    b = add_volume(scene, "B", np.zeros((4, 5, 6), np.int16), GEOM_A)
    inputs = ex.export_segment_inputs(tmp_path, [a, b])
    spec = ex.segment_job_spec(inputs, "model.pt")
    spec.update(task="suggest", n=1, strategy="entropy")
    protocol.write_job(tmp_path, spec)
    ranking = [{"input": str(tmp_path / "inputs" / "B.nrrd"), "score": 0.7, "picked": True, "slice": 3},
               {"input": str(tmp_path / "inputs" / "A.nrrd"), "score": 0.2, "picked": False, "slice": 1}]
    (tmp_path / protocol.EVENTS_FILE).write_text(protocol.encode({"event": "suggested", "ranking": ranking}) + "\n")
    out = labeling.job_ranking(scene, tmp_path)
    assert [(r["node"], r["score"], r["picked"], r["slice"]) for r in out] == [(b, 0.7, True, 3), (a, 0.2, False, 1)]
    # A is axis-aligned: the centre of slice k=1 is origin + spacing * ((6-1)/2, (5-1)/2, 1)
    assert out[1]["ras"] == pytest.approx((10.0 + 0.5 * 2.5, 20.0 + 0.5 * 2.0, 30.0 + 2.0 * 1))
    scene.RemoveNode(b)
    assert [r["node"] for r in labeling.job_ranking(scene, tmp_path)] == [a]


def test_a_corrected_segmentation_takes_the_models_class_names_or_is_refused(scene):
    volume = add_volume(scene, "V", np.zeros((3, 5, 6), np.int16), GEOM_B)
    mask = np.zeros((3, 5, 6), bool)
    mask[1, 1:3, 1:4] = True
    seg = add_segmentation(scene, "edited", volume, [("LIVER", mask, (0.5, 0.5, 0.5))])
    classes = labeling.adopt_classes(seg, CLASSES)
    assert [c.name for c in classes] == ["liver", "spleen"]
    (_, segment), = sc.segments_of(seg)
    assert segment.GetName() == "liver" and segment.GetColor() == pytest.approx(RED)
    wrong = add_segmentation(scene, "wrong", volume, [("kidney", mask, RED)])
    with pytest.raises(im.ImportError_, match=r"segments \['kidney'\] but the model's classes are \['liver', 'spleen'\]"):
        labeling.adopt_classes(wrong, CLASSES)


def _finished_job(folder: Path, labeled: int, dice: float, init_from: str = "") -> Path:
    (folder / "run").mkdir(parents=True)
    (folder / "run" / "best.pt").write_bytes(f"weights of {folder.name}".encode())
    (folder / "run" / "config.json").write_text(json.dumps({"method": "mean_teacher", "dim": 2, "init_from": init_from}))
    (folder / "run" / "metrics.json").write_text(json.dumps({"best_val_dice": dice}))
    cases = [{"name": f"c{i}", "image": f"c{i}.nrrd", "label": f"c{i}.seg.nrrd", "split": "train"} for i in range(labeled)]
    cases.append({"name": "u", "image": "u.nrrd", "label": None, "split": "train"})
    (folder / "job.json").write_text(json.dumps({"task": "train", "dataset": {"classes": CLASSES, "cases": cases}}))
    return folder


def test_model_versions_are_kept_side_by_side(tmp_path):
    lineage = tmp_path / "models" / "heart"
    first = _finished_job(tmp_path / "jobs" / "train-1", labeled=1, dice=0.6)
    v1 = models.save_version(first, lineage)
    second = _finished_job(tmp_path / "jobs" / "train-2", labeled=2, dice=0.7, init_from=str(v1 / "model.pt"))
    v2 = models.save_version(second, lineage)
    assert (v1.name, v2.name) == ("v1", "v2")
    listed = models.versions(lineage)
    assert [(v["version"], v["labeled_cases"], v["best_val_dice"]) for v in listed] == [(1, 1, 0.6), (2, 2, 0.7)]
    assert listed[1]["init_from"] == str(v1 / "model.pt") and listed[1]["name"] == "heart v2"
    assert (v1 / "model.pt").read_bytes() == b"weights of train-1"  # the model a retrain starts from is kept
    assert models.lineage_of(models.load_model_info(v2)) == lineage and models.lineage_of({"checkpoint": "x.pt"}) is None
    (lineage / "v3").mkdir()  # an interrupted copy (no model.json) is not a version, and is never overwritten
    assert len(models.versions(lineage)) == 2
    with pytest.raises(models.ModelError, match="v3 exists but is not a complete model version"):
        models.save_version(second, lineage)


from test_slicer_mrml import disk_volume, semiseg_module, standin, tiny_scene_and_logic  # noqa: E402,F401


def test_label_next_correct_and_retrain_on_a_real_scene(scene, tmp_path, semiseg_module, standin):
    """The loop through the Logic with real trainer processes: rank the unlabeled volumes, segment the best one
    with its uncertainty map (entropy, then a map named as "Rank by" names it), a corrected segmentation joins
    the labeled cases, the retrain warm-starts from the model (its first-iteration loss is the loaded model's
    loss on the same batch) and becomes version v2 while v1 stays as it was."""
    import shutil
    from test_finetune import reference_first_loss
    logic, seg, unlabeled = tiny_scene_and_logic(scene, tmp_path, semiseg_module)
    exact = {"threads": 1, "log_every": 1, "deterministic": True, "precision": "fp32", "channels_last": False,
             "foreground_share": 0.0}  # uniform draws: the reference below draws its batch the same way
    logic.train([seg], unlabeled=unlabeled, method="mean_teacher", dim=2, iterations=6, labeledBatch=2,
                unlabeledBatch=2, device="cpu", patchSize=(32, 32), extraConfig=exact, timeout=240)

    ranking = logic.suggestNext(unlabeled, n=1, strategy="entropy", device="cpu", timeout=240)
    assert sorted(r["node"].GetID() for r in ranking) == sorted(v.GetID() for v in unlabeled)
    assert [r["picked"] for r in ranking] == [True, False] and ranking[0]["score"] >= ranking[1]["score"]
    best = ranking[0]
    assert best["ras"] == pytest.approx(labeling.slice_center_ras(best["node"], best["slice"]))

    finished = []
    (prediction,) = logic.segment([best["node"]], device="cpu", uncertainty=True, finishedCallback=finished.append,
                                  timeout=240)
    (umap,) = finished[0].uncertaintyNodes
    assert umap.GetName() == f"{best['node'].GetName()} SemiSeg uncertainty"
    values = slicer.util.arrayFromVolume(umap)
    assert values.shape == slicer.util.arrayFromVolume(best["node"]).shape and 0 <= values.min() <= values.max() <= 1
    assert 0 <= finished[0].uncertaintyScores[0] <= 1
    # a named map: the panel's "Rank by" margin gives the engine's margin map of the exported volume
    finished = []
    logic.segment([best["node"]], device="cpu", uncertainty="margin", finishedCallback=finished.append, timeout=240)
    (margin,) = finished[0].uncertaintyNodes
    (exported,) = (Path(logic.jobDir) / "inputs").glob("*.nrrd")
    _, expected = Segmenter(logic.model["checkpoint"], "cpu").uncertainty_on_grid(read_volume(exported), "margin")
    assert slicer.util.arrayFromVolume(margin) == pytest.approx(expected.transpose(2, 1, 0), abs=1e-6)  # (z, y, x)
    assert not np.allclose(slicer.util.arrayFromVolume(margin), values)  # not the entropy map again

    # the user corrects the result (here: draws the true disk, named in other case) and adds it
    shift = unlabeled.index(best["node"]) + 1
    _, disk = disk_volume(slicer.vtkMRMLScene(), "truth", shift)
    corrected = add_segmentation(scene, "corrected", best["node"], [("DISK", disk, (0.5, 0.5, 0.5))])
    assert logic.addToLabeled(corrected) == (corrected, best["node"])
    state = logic.panelState()
    assert corrected.GetID() in state.labeled and best["node"].GetID() not in state.unlabeled
    assert [g.GetName() for _, g in sc.segments_of(corrected)] == ["disk"]

    first_model = Path(logic.model["checkpoint"])
    events = []
    others = [v for v in unlabeled if v is not best["node"]]
    result = logic.retrain([seg, corrected], unlabeled=others, iterations=2, device="cpu", extraConfig=exact,
                           progressCallback=lambda p, e: events.append(e), timeout=240)
    assert result.status == "completed"
    versions = logic.modelVersions()
    assert [(v["version"], v["labeled_cases"]) for v in versions] == [(1, 1), (2, 2)]
    v1, v2 = (Path(v["folder"]) for v in versions)
    assert (v1 / "model.pt").read_bytes() == first_model.read_bytes()  # v1 is the model trained first, kept
    assert versions[1]["init_from"] == str(v1 / "model.pt") and Path(logic.model["checkpoint"]) == v2 / "model.pt"
    started = next(e for e in events if e["event"] == "started")
    assert started["warm_start"]["init_from"] == str(v1 / "model.pt")
    # warm start verified: the first iteration's loss is v1's loss on the same first batch
    source = tmp_path / "v1-as-run"
    source.mkdir()
    shutil.copyfile(v1 / "model.pt", source / "best.pt")
    run = Path(logic.lastTrainingJob) / "run"
    config = json.loads((run / "config.json").read_text())  # the configuration the retrain ran with
    first = next(e for e in map(json.loads, (run / "progress.jsonl").read_text().splitlines())
                 if e["event"] == "iteration")
    assert first["iteration"] == 1
    assert first["loss"] == pytest.approx(reference_first_loss(source, config), abs=2e-6)
