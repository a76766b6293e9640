"""Slicer segmentation files (``.seg.nrrd``): reading them as one labelmap on the reference image's grid,
writing a labelmap as one, and the one rule that numbers their segments.

A segmentation stores segments in layers (one labelmap per layer, each segment a label value of its
layer); older files (Slicer < 4.11) store one binary layer per segment. Segment extents and the
reference image geometry (``conversionParameters``) place the stored block on the image's grid. The
file format is read and written with ``slicerio`` (github.com/lassoan/slicerio).
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np

from ..errors import SemiSegError
from .io import _check_readable, _checked_labelmap, _describe_classes, _label_dtype, _lower_name, _short_reason, \
    _stem, _writing, default_color
from .volume import ClassInfo, Geometry, Volume

__all__ = ["is_segmentation_file", "normalize_class_name", "read_segment_classes", "read_segmentation",
           "segment_classes", "write_segmentation"]


def segment_classes(segments: Sequence[dict]) -> list[ClassInfo]:
    """The classes of a segmentation's segments, in file order: each keeps its label value, unless values
    collide (segments of several layers) or are not positive, then they are numbered 1..N in file order;
    names and colours from the segment (palette colour when it has none)."""
    values = [int(s.get("labelValue", 1)) for s in segments]
    if len(set(values)) != len(values) or any(v <= 0 for v in values):
        values = list(range(1, len(segments) + 1))
    out = []
    for i, (s, v) in enumerate(zip(segments, values)):
        color = s.get("color")
        color = tuple(float(c) for c in color[:3]) if color is not None and len(color) >= 3 else default_color(v)
        out.append(ClassInfo(v, _segment_name(s, i), color))
    return out


def _segment_name(segment: dict, index: int) -> str:
    return str(segment.get("name", segment.get("id", f"segment {index + 1}")))


def read_segment_classes(path) -> list[ClassInfo]:
    """:func:`segment_classes` of a segmentation file, from its header alone."""
    import slicerio
    path = os.fspath(path)
    _check_readable(path, "label file")
    try:
        seg = slicerio.read_segmentation(path, skip_voxels=True)
    except Exception as exc:
        raise SemiSegError(f"cannot read segmentation {path}: {_short_reason(exc)}") from None
    return segment_classes(list(seg.get("segments") or []))


def is_segmentation_file(path) -> bool:
    """True for a Slicer segmentation: a NRRD whose header carries segment metadata."""
    path = os.fspath(path)
    lower = _lower_name(path)
    if lower.endswith(".seg.nrrd"):
        return True
    if not lower.endswith(".nrrd") or not os.path.isfile(path):
        return False
    try:
        import nrrd
        header = nrrd.read_header(path)
    except Exception:
        return False
    return any(re.match(r"^Segment\d+_ID$", key) for key in header)


def _parse_reference_geometry(segmentation: dict) -> tuple[np.ndarray, list[int]] | None:
    """Slicer's "Reference image geometry" conversion parameter: (ijkToLPS 4x4, extent) or None."""
    for param in segmentation.get("conversionParameters", []) or []:
        if param.get("name") != "Reference image geometry":
            continue
        parts = [p for p in str(param.get("value", "")).split(";") if p.strip()]
        if len(parts) != 22:
            return None
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            return None
        ijk_to_ras = np.asarray(numbers[:16]).reshape(4, 4)
        extent = [int(round(v)) for v in numbers[16:]]
        if not all(extent[2 * a] <= extent[2 * a + 1] for a in range(3)):
            return None
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_ras, extent
    return None


def _format_reference_geometry(ijk_to_lps: np.ndarray, shape: Sequence[int]) -> str:
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(ijk_to_lps, dtype=float)
    values = [f"{v:.17g}" for v in ijk_to_ras.ravel()] + [str(v) for n in shape for v in (0, int(n) - 1)]
    return ";".join(values) + ";"


def read_segmentation(path: str, classes: Sequence[ClassInfo] | None,
                       mapping: dict | None = None) -> tuple[Volume, list[ClassInfo]]:
    import slicerio
    try:
        seg = slicerio.read_segmentation(path)
    except Exception as exc:
        raise SemiSegError(f"cannot read segmentation {path}: {_short_reason(exc)}") from None
    voxels = seg.get("voxels")
    if voxels is None or voxels.ndim not in (3, 4):
        raise SemiSegError(f"cannot read segmentation {path}: expected a 3D or 4D (layered) voxel array")
    layers = voxels if voxels.ndim == 4 else voxels[None]
    stored_shape = np.asarray(layers.shape[1:])
    file_ijk_to_lps = np.asarray(seg["ijkToLPS"], dtype=float)
    offset = np.asarray(seg.get("referenceImageExtentOffset") or [0, 0, 0], dtype=int)
    segments = list(seg.get("segments") or [])

    # files of Slicer before 4.11 have no layers/label values: one binary component per segment
    legacy = (voxels.ndim == 4 and layers.shape[0] == len(segments) > 1
              and not any("layer" in s or "labelValue" in s for s in segments))
    # masks of the segments, in the stored (file) index space; voxels outside a segment's extent
    # are not part of it (Slicer ignores them too)
    masks = []
    for i, s in enumerate(segments):
        layer = i if legacy else int(s.get("layer", 0))
        if not 0 <= layer < layers.shape[0]:
            raise SemiSegError(f"segmentation {path}: segment '{s.get('name', s.get('id'))}' is in layer "
                               f"{layer}, but the file has {layers.shape[0]} layer(s)")
        mask = layers[layer] == int(s.get("labelValue", 1))
        extent = s.get("extent")
        if extent is not None and len(extent) == 6:
            keep = np.zeros_like(mask)
            lo = [max(int(extent[2 * a]) - offset[a], 0) for a in range(3)]
            hi = [min(int(extent[2 * a + 1]) - offset[a] + 1, stored_shape[a]) for a in range(3)]
            if all(h > l for l, h in zip(lo, hi)):
                keep[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
            mask &= keep
        masks.append(mask)

    names = [_segment_name(s, i) for i, s in enumerate(segments)]
    if len(masks) > 1:
        count = np.zeros(tuple(stored_shape), dtype=np.uint16)
        for m in masks:
            count += m
        if count.max(initial=0) > 1:
            where = tuple(int(i) for i in np.argwhere(count > 1)[0])
            overlapping = [names[i] for i, m in enumerate(masks) if m[where]]
            raise SemiSegError(f"segmentation {path} has overlapping segments ({', '.join(overlapping)}) "
                               f"which cannot be combined into one labelmap")

    # label values of the output
    if mapping is not None:
        values = []
        for name in names:
            if normalize_class_name(name) not in mapping:
                raise SemiSegError(f"segmentation {path} has segment '{name}' that the class matching does "
                                   f"not know (was the file changed?)")
            values.append(int(mapping[normalize_class_name(name)]))
        out_classes = [ClassInfo(c.value, c.name, tuple(c.color)) for c in classes]
    elif classes is not None:
        by_name = {c.name.strip().lower(): c for c in classes}
        values = []
        for name in names:
            c = by_name.get(name.strip().lower())
            if c is None:
                raise SemiSegError(f"segmentation {path} has segment '{name}' that matches none of the "
                                   f"classes ({_describe_classes(classes)})")
            values.append(c.value)
        if len(set(values)) != len(values):
            raise SemiSegError(f"segmentation {path} has several segments with the same class name")
        out_classes = [ClassInfo(c.value, c.name, tuple(c.color)) for c in classes]
    else:
        out_classes = segment_classes(segments)
        values = [c.value for c in out_classes]
    dtype = _label_dtype(max(values, default=0), path)
    stored = np.zeros(tuple(stored_shape), dtype=dtype)
    for m, v in zip(masks, values):
        stored[m] = v

    # place the stored voxels into the reference image's grid
    array, ijk_to_lps = _place_in_reference(stored, file_ijk_to_lps, offset, _parse_reference_geometry(seg))
    return Volume(array, Geometry.from_ijk_to_lps(ijk_to_lps), _stem(path)), out_classes


def _place_in_reference(stored: np.ndarray, file_ijk_to_lps: np.ndarray, offset: np.ndarray,
                        reference: tuple[np.ndarray, list[int]] | None) -> tuple[np.ndarray, np.ndarray]:
    """Embed the stored block (whose first voxel has reference index ``offset``) in the reference extent.

    The file's origin is that of its first stored voxel (Slicer shifts it by the extent offset so that
    readers ignoring the offset still place the data right). Without a usable reference geometry the
    stored block is returned on its own grid. An empty segmentation (Slicer then stores one zero
    voxel) gets the whole reference grid.
    """
    nonzero = np.argwhere(stored != 0)
    if reference is None:
        return stored, file_ijk_to_lps
    ref_matrix, ref_extent = reference
    ref_lo = np.array(ref_extent[0::2])
    ref_hi = np.array(ref_extent[1::2])
    # the reference grid must be the file's grid (same axes and spacing, and the stored block on it)
    same_axes = np.allclose(ref_matrix[:3, :3], file_ijk_to_lps[:3, :3], atol=1e-4)
    expected_origin = ref_matrix[:3, :3] @ offset + ref_matrix[:3, 3]
    tol = 1e-3 * max(1.0, float(np.abs(ref_matrix[:3, :3]).max()))
    same_origin = np.allclose(expected_origin, file_ijk_to_lps[:3, 3], atol=tol)
    if nonzero.size and not (same_axes and same_origin):
        return stored, file_ijk_to_lps  # e.g. oversampled labelmap: keep the stored grid
    lo, hi = ref_lo.copy(), ref_hi.copy()
    if nonzero.size:  # never drop labelled voxels lying outside the reference extent
        lo = np.minimum(lo, nonzero.min(axis=0) + offset)
        hi = np.maximum(hi, nonzero.max(axis=0) + offset)
    shape = tuple(int(v) for v in hi - lo + 1)
    out = np.zeros(shape, dtype=stored.dtype)
    src_lo = np.maximum(lo - offset, 0)
    src_hi = np.minimum(hi - offset + 1, np.asarray(stored.shape))
    if np.all(src_hi > src_lo):
        dst_lo = src_lo + offset - lo
        dst_hi = dst_lo + (src_hi - src_lo)
        out[dst_lo[0]:dst_hi[0], dst_lo[1]:dst_hi[1], dst_lo[2]:dst_hi[2]] = \
            stored[src_lo[0]:src_hi[0], src_lo[1]:src_hi[1], src_lo[2]:src_hi[2]]
    matrix = ref_matrix.copy()
    matrix[:3, 3] = ref_matrix[:3, :3] @ lo + ref_matrix[:3, 3]
    return out, matrix


def write_segmentation(path, labelmap: np.ndarray, geometry: Geometry, classes: Sequence[ClassInfo]) -> None:
    """Write a Slicer ``.seg.nrrd``: one segment per class (also empty ones), all in layer 0.

    Segment IDs are ``Segment_<value>``; each segment's label value is its class value. The reference
    image geometry is recorded so that Slicer (and :func:`read_label`) know the full grid.
    """
    import slicerio
    path = os.fspath(path)
    labelmap = _checked_labelmap(labelmap, path)
    values = [int(c.value) for c in classes]
    if len(set(values)) != len(values) or any(v <= 0 for v in values):
        raise SemiSegError(f"cannot write segmentation {path}: class values must be distinct and positive "
                           f"({_describe_classes(classes)})")
    present = set(int(v) for v in np.unique(labelmap)) - {0}
    missing = sorted(present - set(values))
    if missing:
        raise SemiSegError(f"cannot write segmentation {path}: label value(s) {', '.join(map(str, missing))} "
                           f"have no class ({_describe_classes(classes)})")
    if max(values, default=0) > 255:
        labelmap = labelmap.astype(np.uint16)
    ijk_to_lps = geometry.ijk_to_lps()
    shape = labelmap.shape
    seg = slicerio.create_segmentation(shape, ijk_to_lps, dtype=labelmap.dtype)
    seg["voxels"] = np.ascontiguousarray(labelmap)
    seg["containedRepresentationNames"] = ["Binary labelmap"]
    seg["masterRepresentation"] = "Binary labelmap"
    seg["referenceImageExtentOffset"] = [0, 0, 0]
    seg["conversionParameters"] = [{
        "name": "Reference image geometry",
        "value": _format_reference_geometry(ijk_to_lps, shape),
        "description": "Image geometry description string determining the geometry of the labelmap "
                       "that is created in course of conversion.",
    }]
    full_extent = [0, shape[0] - 1, 0, shape[1] - 1, 0, shape[2] - 1]
    seg["segments"] = [{
        "id": f"Segment_{c.value}",
        "name": c.name,
        "color": [float(x) for x in c.color],
        "colorAutoGenerated": False,
        "nameAutoGenerated": False,
        "labelValue": int(c.value),
        "layer": 0,
        # the full extent for every segment (also empty ones): older Slicer versions cropped all
        # segments of a layer to the first segment's extent
        "extent": list(full_extent),
    } for c in classes]
    with _writing(path) as tmp:
        slicerio.write_segmentation(tmp, seg)


def normalize_class_name(name) -> str:
    """The key segment names are matched by: case-insensitive, trimmed, inner whitespace collapsed."""
    return " ".join(str(name).split()).casefold()
