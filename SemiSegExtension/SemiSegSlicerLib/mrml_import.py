"""Prediction files → segmentation nodes (no Qt; explicit scene; runs on real MRML outside Slicer).

The engine writes, for every input ``X.nrrd``, ``X.seg.nrrd`` (one segment per class, ID
``Segment_<value>``, name and colour of the class, on the input's exact grid) and ``X.label.nrrd``.
Here the ``.seg.nrrd`` is read with Slicer's own segmentation storage node, the class names, colours
and terminology of the training segmentations are re-applied, the reference geometry is set to the
input volume, the geometry is checked against the volume's (world) grid, and the node is placed
next to the volume in the subject hierarchy.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .mrml_export import world_ijk_to_ras
from .segment_classes import ClassEntry, class_key


class ImportError_(Exception):
    """A prediction that cannot be loaded, as one line (named so as not to shadow ``ImportError``)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def _slicer():
    import slicer
    return slicer


def ensure_converter_rules() -> None:
    """Register the labelmap ↔ closed-surface conversion rules if nobody did (the Segmentations module
    does this in Slicer; headless MRML needs it for empty segments and 3D display)."""
    slicer = _slicer()
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    names = {rule.GetName() for rule in factory.GetConverterRules()}
    for cls in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule, slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        rule = cls()
        if rule.GetName() not in names:
            factory.RegisterConverterRule(rule)


def _classes(classes) -> list[ClassEntry]:
    return [c if isinstance(c, ClassEntry) else ClassEntry.from_dict(c) for c in (classes or [])]


def apply_classes(seg_node, classes) -> None:
    """Names, colours and terminology of the classes onto matching segments (ID ``Segment_<value>``
    or the same name)."""
    classes = _classes(classes)
    s = seg_node.GetSegmentation()
    by_id = {f"Segment_{c.value}": c for c in classes}
    by_name = {class_key(c.name): c for c in classes}
    for i in range(s.GetNumberOfSegments()):
        sid, seg = s.GetNthSegmentID(i), s.GetNthSegment(i)
        c = by_id.get(sid) or by_name.get(class_key(seg.GetName()))
        if c is None:
            continue
        seg.SetName(c.name)
        seg.SetColor(*c.color)
        if c.terminology:
            seg.SetTag(seg.GetTerminologyEntryTagName(), c.terminology)


def labelmap_geometry(seg_node) -> np.ndarray | None:
    """Image-to-world 4x4 of the segmentation's binary labelmap (first segment), or None if empty."""
    import vtk
    slicer = _slicer()
    s = seg_node.GetSegmentation()
    for i in range(s.GetNumberOfSegments()):
        rep = slicer.vtkOrientedImageData()
        if seg_node.GetBinaryLabelmapRepresentation(s.GetNthSegmentID(i), rep):
            m = vtk.vtkMatrix4x4()
            rep.GetImageToWorldMatrix(m)
            return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    return None


def import_segmentation(scene, seg_file, reference_volume=None, name: str | None = None, classes=None,
                        show3d: bool = False):
    """Load a ``.seg.nrrd`` prediction as a new segmentation node (see the module docstring)."""
    slicer = _slicer()
    ensure_converter_rules()
    seg_file = Path(seg_file)
    if not seg_file.is_file():
        raise ImportError_(f"prediction not found: {seg_file}")
    if name is None:
        stem = seg_file.name[: -len(".seg.nrrd")] if seg_file.name.endswith(".seg.nrrd") else seg_file.stem
        name = f"{reference_volume.GetName() if reference_volume is not None else stem} SemiSeg"
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(seg_file))
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        raise ImportError_(f"cannot read the prediction {seg_file}")
    apply_classes(node, classes)
    if reference_volume is not None:
        _check_geometry(node, reference_volume, seg_file)
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        _place_in_hierarchy(scene, node, reference_volume)
    if show3d:
        node.CreateClosedSurfaceRepresentation()
    return node


def import_labelmap(scene, label_file, classes, reference_volume=None, name: str | None = None):
    """Load a plain labelmap prediction (``X.label.nrrd``) through a colour table built from the
    classes: segments get the class names (as IDs too) and colours, empty classes excepted."""
    slicer = _slicer()
    ensure_converter_rules()
    classes = _classes(classes)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{Path(label_file).name} SemiSeg")
    node.CreateDefaultDisplayNodes()
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "SemiSegImportColors")
    try:
        table.SetTypeToUser()
        table.SetNumberOfColors(max([c.value for c in classes], default=0) + 1)
        table.SetColor(0, "Background", 0.0, 0.0, 0.0, 0.0)
        for c in classes:
            table.SetColor(c.value, c.name, *c.color, 1.0)
        node.SetLabelmapConversionColorTableNodeID(table.GetID())
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(label_file))
        ok = storage.ReadData(node)
        node.SetLabelmapConversionColorTableNodeID(None)
    finally:
        scene.RemoveNode(table)
    if not ok:
        scene.RemoveNode(node)
        raise ImportError_(f"cannot read the prediction {label_file}")
    apply_classes(node, classes)
    if reference_volume is not None:
        _check_geometry(node, reference_volume, label_file)
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        _place_in_hierarchy(scene, node, reference_volume)
    return node


def _check_geometry(node, volume, path) -> None:
    """The prediction must lie on the volume's world grid (it was computed on the exported file)."""
    got = labelmap_geometry(node)
    if got is None:
        return
    want = world_ijk_to_ras(volume)
    scale = max(1.0, float(np.abs(want[:3, :3]).max()))
    if not (np.allclose(got[:3, :3], want[:3, :3], atol=1e-4 * scale)
            and _on_grid(got[:3, 3], want, tol=1e-3)):
        raise ImportError_(f"prediction {Path(path).name} does not lie on the grid of '{volume.GetName()}' "
                           f"(was the volume moved or resampled after segmentation started?)")


def _on_grid(origin: np.ndarray, ijk_to_ras: np.ndarray, tol: float) -> bool:
    """True if ``origin`` is a voxel position of the grid (segment extents may start at an offset)."""
    ijk = np.linalg.solve(ijk_to_ras[:3, :3], origin - ijk_to_ras[:3, 3])
    return bool(np.allclose(ijk, np.round(ijk), atol=tol))


def _place_in_hierarchy(scene, node, volume) -> None:
    """Put the segmentation beside its volume (same study/folder) when a subject hierarchy exists."""
    slicer = _slicer()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        return
    invalid = getattr(sh, "GetInvalidItemID", lambda: 0)()
    vol_item, seg_item = sh.GetItemByDataNode(volume), sh.GetItemByDataNode(node)
    if vol_item == invalid or seg_item == invalid:
        return
    parent = sh.GetItemParent(vol_item)
    if parent != invalid:
        sh.SetItemParent(seg_item, parent)


def import_job_predictions(scene, job_dir, classes=None, show3d: bool = False) -> list:
    """Every prediction of a finished segment job → segmentation nodes named "<volume> SemiSeg",
    referencing the volumes recorded in the job (``volume_ids``). Volumes removed meanwhile are skipped."""
    from semiseg_trainer import protocol
    job = Path(job_dir)
    spec = json.loads((job / protocol.JOB_FILE).read_text())
    volume_ids = spec.get("volume_ids", {})
    nodes = []
    for e in protocol.read_events(job):
        if e.get("event") != "predicted":
            continue
        seg_file = Path(e["segmentation"])
        stem = seg_file.name[: -len(".seg.nrrd")]
        volume = scene.GetNodeByID(volume_ids[stem]) if stem in volume_ids else None
        if stem in volume_ids and volume is None:
            continue
        nodes.append(import_segmentation(scene, seg_file, volume, classes=classes, show3d=show3d))
    return nodes
