"""The labeling loop in the scene (no Qt; explicit scene; runs on real MRML outside Slicer): uncertainty maps
loaded as volumes with their own colour table, where to look in a suggested volume, and a corrected
segmentation checked and named as the model's classes before it joins the labeled cases."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .mrml_export import vtk_matrix, world_ijk_to_ras
from .segment_classes import ClassEntry, class_key, collect_classes, segments_of
from .mrml_import import ImportError_, apply_classes

UNCERTAINTY_COLORS = "SemiSeg uncertainty"


def _slicer():
    import slicer
    return slicer


def uncertainty_color_table(scene):
    """A 256-entry colour table for uncertainty maps (dark blue → yellow → red), created once per scene."""
    node = scene.GetFirstNodeByName(UNCERTAINTY_COLORS)
    if node is not None and node.IsA("vtkMRMLColorTableNode"):
        return node
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", UNCERTAINTY_COLORS)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    stops = np.array([[0.0, 0.05, 0.05, 0.3], [0.5, 0.95, 0.85, 0.1], [1.0, 0.85, 0.05, 0.05]])
    for i in range(256):
        t = i / 255
        rgb = [float(np.interp(t, stops[:, 0], stops[:, c])) for c in (1, 2, 3)]
        node.SetColor(i, f"{i}", *rgb, 1.0)
    node.SetAttribute("Category", "SemiSeg")
    return node


def import_uncertainty(scene, path, volume, name: str | None = None):
    """An ``X.uncertainty.nrrd`` (0..1 per voxel, written by the engine on the exported volume's world grid)
    as a scalar volume node "<volume> SemiSeg uncertainty" with the uncertainty colour table, window 0..1.
    Read with the engine's reader, so voxel order and geometry are exactly the exported file's; a map on
    another grid than the volume's is refused."""
    from semiseg.data.io import read_volume
    from semiseg.errors import SemiSegError
    path = Path(path)
    try:
        image = read_volume(path)
    except SemiSegError as e:
        raise ImportError_(str(e)) from None
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.geometry.ijk_to_lps()
    want = world_ijk_to_ras(volume)
    if image.array.ndim != 3 or not np.allclose(ijk_to_ras, want, atol=1e-4 * max(1.0, float(np.abs(want[:3, :3]).max()))):
        raise ImportError_(f"uncertainty map {path.name} does not lie on the grid of '{volume.GetName()}'")
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or f"{volume.GetName()} SemiSeg uncertainty")
    node.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras))
    _slicer().util.updateVolumeFromArray(node, np.ascontiguousarray(image.array.transpose(2, 1, 0), dtype=np.float32))
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(uncertainty_color_table(scene).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    return node


def slice_center_ras(volume, k: int) -> tuple[float, float, float]:
    """World RAS of the centre of slice ``k`` (the last array axis of the exported file, IJK's k) of
    ``volume``: where the views jump to show a suggested volume's most uncertain slice."""
    dims = volume.GetImageData().GetDimensions()
    ijk = np.array([(dims[0] - 1) / 2, (dims[1] - 1) / 2, float(k), 1.0])
    ras = world_ijk_to_ras(volume) @ ijk
    return float(ras[0]), float(ras[1]), float(ras[2])


def adopt_classes(seg_node, model_classes) -> list[ClassEntry]:
    """Check a corrected segmentation against the model's classes and give its segments the classes' names,
    colours and terminology. Every segment must be a class of the model (names compared as the export
    does); a class without a segment is allowed (an empty class). Returns the model's class table."""
    classes = [c if isinstance(c, ClassEntry) else ClassEntry.from_dict(c) for c in model_classes]
    known = {class_key(c.name) for c in classes}
    names = [seg.GetName() for _, seg in segments_of(seg_node)]
    unknown = [n for n in names if class_key(n) not in known]
    if unknown or not names:
        raise ImportError_(f"segmentation '{seg_node.GetName()}' has segments {names} but the model's classes are "
                           f"{[c.name for c in classes]}: rename the segments to the model's classes"
                           + (f" (not classes: {unknown})" if unknown else ""))
    collect_classes([seg_node])  # the export's own checks (duplicate names, ...) as one line
    apply_classes(seg_node, classes)
    return classes


def _job_volumes(scene, job_dir) -> tuple[dict, list]:
    """(stem -> volume node of the job's inputs, the job's events)."""
    from semiseg_trainer import protocol
    job = Path(job_dir)
    spec = json.loads((job / protocol.JOB_FILE).read_text())
    volumes = {stem: scene.GetNodeByID(node_id) for stem, node_id in spec.get("volume_ids", {}).items()}
    return {k: v for k, v in volumes.items() if v is not None}, protocol.read_events(job)


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".uncertainty.nrrd", ".seg.nrrd", ".label.nrrd", ".nrrd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def import_job_uncertainty(scene, job_dir) -> tuple[list, list]:
    """The uncertainty maps of a finished segment job (events with ``uncertainty``) as volume nodes, and their
    per-volume scores, in the order of the job's predictions (volumes removed meanwhile are skipped)."""
    volumes, events = _job_volumes(scene, job_dir)
    nodes, scores = [], []
    for e in events:
        if e.get("event") != "predicted" or not e.get("uncertainty"):
            continue
        volume = volumes.get(_stem(e["uncertainty"]))
        if volume is None:
            continue
        nodes.append(import_uncertainty(scene, e["uncertainty"], volume))
        scores.append(float(e.get("uncertainty_score", float("nan"))))
    return nodes, scores


def job_ranking(scene, job_dir) -> list[dict]:
    """A finished suggest job's ranking, best first: ``{"node", "score", "picked", "slice", "ras"}`` per
    volume still in the scene."""
    volumes, events = _job_volumes(scene, job_dir)
    ranking = next((e.get("ranking", []) for e in reversed(events) if e.get("event") == "suggested"), [])
    out = []
    for r in ranking:
        volume = volumes.get(_stem(r["input"]))
        if volume is None:
            continue
        k = int(r.get("slice", 0))
        out.append({"node": volume, "score": float(r["score"]), "picked": bool(r.get("picked")), "slice": k,
                    "ras": slice_center_ras(volume, k)})
    return out
