"""Scene → job folder: labeled cases (segmentation + source volume), unlabeled volumes, the class table.

No Qt and no ``slicer.mrmlScene``/``slicer.modules``: every function takes the scene explicitly and
uses the static ``vtkSlicerSegmentationsModuleLogic`` calls, so it runs on real MRML outside Slicer.

What gets written (``job/data``): each volume as an uncompressed NRRD on its own grid, a labelmap per
labeled case on *exactly* that grid (``ExportSegmentsToLabelmapNode`` with the volume as reference
geometry), label values taken from one class table shared by every case (segments are matched by
name, not by ID or order). Nodes under a linear transform are written in world coordinates (the
transform is hardened into the file's geometry, the scene is not changed); non-linear transforms are
refused. Every problem is an :class:`ExportError` with one line that names the node.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from semiseg.errors import SemiSegError

from .segment_classes import ClassEntry, class_key, collect_classes, segments_of

DATA_DIR = "data"
INPUTS_DIR = "inputs"
DATASET_CSV = "dataset.csv"


class ExportError(SemiSegError):
    """A problem with the user's nodes, as one actionable line."""


def _slicer():
    import slicer
    return slicer


# ---------------------------------------------------------------------------------------- pairing
def source_volume(seg_node):
    """The volume a segmentation was drawn on (its reference image geometry link), or None."""
    ref = seg_node.GetNodeReference(seg_node.GetReferenceImageGeometryReferenceRole())
    if ref is not None and ref.IsA("vtkMRMLScalarVolumeNode") and not ref.IsA("vtkMRMLLabelMapVolumeNode"):
        return ref
    return None


def pair_cases(seg_nodes, chosen_volumes: dict | None = None) -> list[tuple[object, object]]:
    """[(segmentation, volume)]: the hand-picked volume (``chosen_volumes[seg.GetID()]``) or the
    reference-geometry link; ExportError naming the segmentation when neither exists."""
    pairs = []
    for seg in seg_nodes:
        vol = (chosen_volumes or {}).get(seg.GetID()) or source_volume(seg)
        if vol is None:
            raise ExportError(f"segmentation '{seg.GetName()}' has no source volume: pick its volume by hand "
                              f"(or set it as source volume in Segment Editor)")
        pairs.append((seg, vol))
    return pairs


# ---------------------------------------------------------------------------------------- geometry
def world_ijk_to_ras(node) -> np.ndarray:
    """IJK→RAS of a volume in world coordinates (a linear parent transform hardened in)."""
    import vtk
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    t = node.GetParentTransformNode()
    if t is None:
        return ijk
    if not t.IsTransformToWorldLinear():
        raise ExportError(f"'{node.GetName()}' is under the non-linear transform '{t.GetName()}': harden or "
                          f"remove the transform first (Data module, right-click, Harden transform)")
    w = vtk.vtkMatrix4x4()
    t.GetMatrixTransformToWorld(w)
    world = np.array([[w.GetElement(r, c) for c in range(4)] for r in range(4)])
    return world @ ijk


def vtk_matrix(a: np.ndarray):
    import vtk
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def write_volume_file(node, path: Path, ijk_to_ras: np.ndarray | None = None) -> Path:
    """Write a volume (or labelmap) as uncompressed NRRD with its world geometry (or ``ijk_to_ras``),
    leaving the node and its storage node untouched (a temporary node outside the scene shares the
    image data)."""
    slicer = _slicer()
    image = node.GetImageData()
    if image is None:
        raise ExportError(f"volume '{node.GetName()}' has no image data")
    if image.GetNumberOfScalarComponents() != 1:
        raise ExportError(f"volume '{node.GetName()}' has {image.GetNumberOfScalarComponents()} components per "
                          f"voxel; SemiSeg needs a scalar (grey-level) volume")
    tmp = slicer.vtkMRMLLabelMapVolumeNode() if node.IsA("vtkMRMLLabelMapVolumeNode") else slicer.vtkMRMLScalarVolumeNode()
    tmp.SetAndObserveImageData(image)
    tmp.SetIJKToRASMatrix(vtk_matrix(world_ijk_to_ras(node) if ijk_to_ras is None else ijk_to_ras))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.UseCompressionOff()
    if not storage.WriteData(tmp):
        raise ExportError(f"cannot write '{node.GetName()}' to {path} (disk full or folder not writable?)")
    return path


# ---------------------------------------------------------------------------------------- labelmaps
class _TemporaryNodes:
    """Remove every node added to the scene inside the block (the export logic adds display and colour
    nodes of its own besides ours); scene singletons such as the subject hierarchy are kept."""

    def __init__(self, scene):
        self.scene = scene

    def __enter__(self):
        self.before = {self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())}
        return self

    def __exit__(self, *exc):
        added = [self.scene.GetNthNode(i) for i in range(self.scene.GetNumberOfNodes())]
        for node in added:
            if node is not None and node.GetID() not in self.before and not node.GetSingletonTag():
                self.scene.RemoveNode(node)
        return False


def _segment_voxel_count(segment) -> int:
    """Voxels of a segment in its own binary labelmap (0 for an empty segment)."""
    from vtk.util import numpy_support
    rep = segment.GetRepresentation("Binary labelmap")
    if rep is None or rep.GetPointData() is None or rep.GetPointData().GetScalars() is None:
        return 0
    ext = rep.GetExtent()
    if ext[1] < ext[0] or ext[3] < ext[2] or ext[5] < ext[4]:
        return 0
    return int((numpy_support.vtk_to_numpy(rep.GetPointData().GetScalars()) == segment.GetLabelValue()).sum())


def case_labelmap(scene, seg_node, volume_node, classes: list[ClassEntry]) -> np.ndarray:
    """The case's labelmap on the volume's grid, (k, j, i) like ``arrayFromVolume``, class values.

    Uses ``ExportSegmentsToLabelmapNode`` with the volume as reference geometry (resampling a
    segmentation drawn on another grid, following parent transforms) and a temporary colour table
    whose entry names are this segmentation's exact segment names at the class values.
    """
    slicer = _slicer()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    by_key = {class_key(c.name): c for c in classes}
    segs = [(sid, seg) for sid, seg in segments_of(seg_node) if class_key(seg.GetName()) in by_key]
    if not segs:
        raise ExportError(f"segmentation '{seg_node.GetName()}' has none of the classes "
                          f"({', '.join(c.name for c in classes)})")
    with _TemporaryNodes(scene):
        color_table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "SemiSegExportColors")
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "SemiSegExportLabelmap")
        color_table.SetTypeToUser()
        color_table.SetNumberOfColors(max(c.value for c in classes) + 1)
        color_table.SetColor(0, "Background", 0.0, 0.0, 0.0, 0.0)
        for _, seg in segs:
            c = by_key[class_key(seg.GetName())]
            color_table.SetColor(c.value, seg.GetName(), *c.color, 1.0)
        ok = logic.ExportSegmentsToLabelmapNode(seg_node, [sid for sid, _ in segs], labelmap, volume_node,
                                                slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, color_table)
        if not ok or labelmap.GetImageData() is None:
            raise ExportError(f"cannot export segmentation '{seg_node.GetName()}' on the grid of "
                              f"'{volume_node.GetName()}'")
        array = np.array(slicer.util.arrayFromVolume(labelmap))
    expected = {by_key[class_key(seg.GetName())].value for _, seg in segs}
    found = set(int(v) for v in np.unique(array)) - {0}
    if not found <= expected:  # a colour-table match failed: never train on wrong values
        raise ExportError(f"segmentation '{seg_node.GetName()}': exported label values {sorted(found)} are not "
                          f"the class values {sorted(expected)}")
    counts = {sid: _segment_voxel_count(seg) for sid, seg in segs}
    if not found and any(counts.values()):
        raise ExportError(f"segmentation '{seg_node.GetName()}' does not overlap its volume "
                          f"'{volume_node.GetName()}' (wrong volume picked, or a transform moved one of them)")
    if seg_node.GetSegmentation().GetNumberOfLayers() > 1:
        _check_overlap(scene, seg_node, volume_node, segs)
    return array.astype(np.uint8 if max(c.value for c in classes) <= 255 else np.uint16)


def _check_overlap(scene, seg_node, volume_node, segs) -> None:
    """Overlapping segments (several layers) cannot become one labelmap: name the first overlap."""
    slicer = _slicer()
    count = None
    owner: np.ndarray | None = None
    for index, (sid, seg) in enumerate(segs):
        with _TemporaryNodes(scene):
            labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "SemiSegOverlapCheck")
            slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                seg_node, [sid], labelmap, volume_node, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
            mask = np.array(slicer.util.arrayFromVolume(labelmap)) > 0
        if count is None:
            count, owner = np.zeros(mask.shape, np.uint8), np.full(mask.shape, -1, int)
        both = mask & (count > 0)
        if both.any():
            other = segs[int(owner[both][0])][1].GetName()
            raise ExportError(f"segmentation '{seg_node.GetName()}': segments '{other}' and '{seg.GetName()}' "
                              f"overlap in {int(both.sum())} voxels; a voxel can have one class only")
        count += mask
        owner[mask] = index


# ---------------------------------------------------------------------------------------- jobs
def safe_name(name: str, used: set[str] | None = None) -> str:
    """A file-name-safe, unique (within ``used``) version of a node name."""
    base = re.sub(r"[^A-Za-z0-9_\-]+", "_", name).strip("_")[:60] or "volume"
    out, n = base, 2
    while used is not None and out.lower() in used:
        out, n = f"{base}_{n}", n + 1
    if used is not None:
        used.add(out.lower())
    return out


@dataclass
class CaseExport:
    name: str
    volume_id: str
    image: str                     # relative to the job folder
    label: str | None = None
    segmentation_id: str | None = None
    split: str = "train"
    voxels: dict = field(default_factory=dict)   # class name -> voxel count

    def to_dict(self) -> dict:
        return {"name": self.name, "image": self.image, "label": self.label, "split": self.split,
                "volume_id": self.volume_id, "segmentation_id": self.segmentation_id, "voxels": self.voxels}


@dataclass
class TrainingExport:
    job_dir: Path
    classes: list[ClassEntry]
    cases: list[CaseExport]
    warnings: list[str]

    def summary(self) -> str:
        lab = sum(1 for c in self.cases if c.label and c.split == "train")
        val = sum(1 for c in self.cases if c.split == "val")
        unl = sum(1 for c in self.cases if not c.label)
        return (f"{lab} labeled, {unl} unlabeled, {val} validation case(s); classes: "
                f"{', '.join(c.name for c in self.classes)}")


def export_training_data(scene, job_dir, labeled_pairs, unlabeled_volumes=(), validation_cases: int = 0,
                         allow_missing_classes: bool = False) -> TrainingExport:
    """Write every case of a training job into ``job_dir/data`` plus ``dataset.csv``.

    ``labeled_pairs``: [(segmentation node, volume node)] (see :func:`pair_cases`);
    ``unlabeled_volumes``: volume nodes (those already used by a labeled case are skipped);
    ``validation_cases``: the last N labeled cases validate instead of training (at least one stays).
    """
    job = Path(job_dir)
    labeled_pairs = list(labeled_pairs)
    if not labeled_pairs:
        raise ExportError("no labeled case: check at least one segmentation (with its source volume)")
    table = collect_classes([s for s, _ in labeled_pairs], allow_missing=allow_missing_classes)
    if table.problems:
        more = f" (and {len(table.problems) - 1} more problem(s))" if len(table.problems) > 1 else ""
        raise ExportError(table.problems[0] + more)
    if validation_cases >= len(labeled_pairs):
        raise ExportError(f"{validation_cases} validation case(s) requested but only {len(labeled_pairs)} labeled "
                          f"case(s): at least one must be left for training")
    used: set[str] = set()
    cases: list[CaseExport] = []
    labeled_volume_ids = set()
    totals = {c.name: 0 for c in table.classes}
    for i, (seg, vol) in enumerate(labeled_pairs):
        name = safe_name(vol.GetName(), used)
        labels = case_labelmap(scene, seg, vol, table.classes)
        world = world_ijk_to_ras(vol)
        image_rel, label_rel = f"{DATA_DIR}/{name}.nrrd", f"{DATA_DIR}/{name}.label.nrrd"
        write_volume_file(vol, job / image_rel, world)
        _write_labelmap(labels, vol, job / label_rel, world)
        voxels = {c.name: int((labels == c.value).sum()) for c in table.classes}
        for k, v in voxels.items():
            totals[k] += v
        split = "val" if i >= len(labeled_pairs) - validation_cases else "train"
        cases.append(CaseExport(name, vol.GetID(), image_rel, label_rel, seg.GetID(), split, voxels))
        labeled_volume_ids.add(vol.GetID())
    seen = set(labeled_volume_ids)
    for vol in unlabeled_volumes:
        if vol is None or vol.GetID() in seen:
            continue
        seen.add(vol.GetID())
        name = safe_name(vol.GetName(), used)
        rel = f"{DATA_DIR}/{name}.nrrd"
        write_volume_file(vol, job / rel)
        cases.append(CaseExport(name, vol.GetID(), rel))
    warnings = list(table.warnings)
    warnings += [f"class '{k}' has no voxel in any labeled case" for k, v in totals.items() if v == 0]
    with open(job / DATASET_CSV, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "split"])
        for c in cases:
            w.writerow([c.image, c.label or "", c.split])
    return TrainingExport(job, table.classes, cases, warnings)


def _write_labelmap(array: np.ndarray, volume_node, path: Path, world: np.ndarray) -> None:
    slicer = _slicer()
    tmp = slicer.vtkMRMLLabelMapVolumeNode()
    tmp.SetIJKToRASMatrix(vtk_matrix(world))
    slicer.util.updateVolumeFromArray(tmp, np.ascontiguousarray(array))
    tmp.SetName(volume_node.GetName() + " labels")
    write_volume_file(tmp, path, world)


def training_job_spec(export: TrainingExport, config: dict, resume: bool = False) -> dict:
    """The ``job.json`` of a training job (write it with ``protocol.write_job``)."""
    config = {**config, "data": str(export.job_dir / DATASET_CSV)}
    return {"task": "train", "config": config, "resume": bool(resume),
            "dataset": {"classes": [c.to_dict() for c in export.classes],
                        "cases": [c.to_dict() for c in export.cases]}}


def export_segment_inputs(job_dir, volumes) -> dict[str, str]:
    """Write the volumes to segment into ``job/inputs``; returns {file stem: volume node ID}."""
    job = Path(job_dir)
    used: set[str] = set()
    out = {}
    volumes = [v for v in volumes if v is not None]
    if not volumes:
        raise ExportError("no volume to segment: check at least one volume")
    for vol in volumes:
        name = safe_name(vol.GetName(), used)
        write_volume_file(vol, job / INPUTS_DIR / f"{name}.nrrd")
        out[name] = vol.GetID()
    return out


def segment_job_spec(inputs: dict[str, str], model: str | Path, device: str = "auto") -> dict:
    return {"task": "segment", "model": str(model), "device": device,
            "inputs": [f"{INPUTS_DIR}/{stem}.nrrd" for stem in inputs],
            "volume_ids": inputs}

