"""Reading and writing images, labelmaps and Slicer segmentations.

Conventions (see :mod:`semiseg.data.volume`): arrays are in (x, y, z) = ITK index order, which is the
transpose of ``SimpleITK.GetArrayFromImage``; geometry is LPS. Nothing here ever resamples: a label
either lies on its image's grid or it is rejected with a one-line :class:`SemiSegError`.

Every writer is atomic (:mod:`semiseg.atomic`): an interrupted write never leaves a half-written file at
the final path.
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator, Sequence

import numpy as np

from ..atomic import atomic_path
from ..errors import SemiSegError
from .volume import ClassInfo, Geometry, Volume

__all__ = [
    "DEFAULT_PALETTE", "default_color", "read_volume", "read_label", "check_same_grid",
    "normalize_class_name", "parse_class_map", "label_file_classes", "match_label_classes",
    "write_volume", "write_labelmap", "write_segmentation", "is_segmentation_file",
]

# Distinct colours (RGB in [0, 1]) for classes that come without one; value v gets entry (v - 1) % n.
DEFAULT_PALETTE: tuple[tuple[float, float, float], ...] = (
    (0.902, 0.294, 0.208),  # red
    (0.302, 0.686, 0.290),  # green
    (0.216, 0.494, 0.722),  # blue
    (0.992, 0.749, 0.200),  # yellow
    (0.596, 0.306, 0.639),  # purple
    (0.100, 0.745, 0.812),  # cyan
    (1.000, 0.498, 0.000),  # orange
    (0.969, 0.506, 0.749),  # pink
    (0.651, 0.337, 0.157),  # brown
    (0.600, 0.600, 0.600),  # grey
    (0.737, 0.741, 0.133),  # olive
    (0.400, 0.761, 0.647),  # teal
)

_MULTI_FILE_SUFFIXES = (".nhdr", ".mhd", ".hdr")


def default_color(value: int) -> tuple[float, float, float]:
    """Colour of the default palette for a label value (1 -> first entry)."""
    return DEFAULT_PALETTE[(int(value) - 1) % len(DEFAULT_PALETTE)]


# ----------------------------------------------------------------------------------------------
# helpers

def _sitk():
    import SimpleITK as sitk
    return sitk


def _short_reason(exc: BaseException) -> str:
    """The informative part of a (often multi-line, verbose) ITK/SimpleITK/pynrrd error message."""
    text = str(exc).strip() or type(exc).__name__
    marker = text.rfind("ERROR:")
    if marker >= 0:
        text = text[marker + len("ERROR:"):]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    lines[0] = re.sub(r"^\w+ImageIO\(0x[0-9a-fA-F]+\):\s*", "", lines[0])
    reason = lines[0]
    if len(lines) > 1:
        reason += " ... " + re.sub(r"^\[\w+\]\s*", "", lines[-1])
    return reason if len(reason) <= 300 else reason[:297] + "..."


def _check_readable(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise SemiSegError(f"cannot read {what} {path}: file not found")
    if os.path.isdir(path):
        raise SemiSegError(f"cannot read {what} {path}: it is a folder, not a file")


def _lower_name(path: str) -> str:
    return os.path.basename(str(path)).lower()


def _geometry_from_sitk(img) -> Geometry:
    """From a SimpleITK image or an ImageFileReader after ReadImageInformation (same getters)."""
    dim = img.GetDimension()
    spacing = list(img.GetSpacing())
    origin = list(img.GetOrigin())
    direction = np.asarray(img.GetDirection(), dtype=float).reshape(dim, dim)
    if dim == 2:
        spacing.append(1.0)
        origin.append(0.0)
        d3 = np.eye(3)
        d3[:2, :2] = direction
        direction = d3
    return Geometry(tuple(float(s) for s in spacing), tuple(float(o) for o in origin),
                    tuple(float(d) for d in direction.ravel()))


def _read_sitk(path: str, what: str):
    """(image, array in (x, y, z)) of a 2D/3D scalar or vector image; SemiSegError on failure."""
    path = os.fspath(path)
    _check_readable(path, what)
    sitk = _sitk()
    try:
        img = sitk.ReadImage(path)
    except Exception as exc:  # SimpleITK raises RuntimeError with a long multi-line message
        raise SemiSegError(f"cannot read {what} {path}: {_short_reason(exc)}") from None
    dim = img.GetDimension()
    if dim not in (2, 3):
        raise SemiSegError(f"cannot read {what} {path}: it has {dim} dimensions, expected a 2D or 3D image")
    arr = sitk.GetArrayViewFromImage(img)  # (z, y, x[, c]) or (y, x[, c])
    ncomp = img.GetNumberOfComponentsPerPixel()
    spatial = arr.ndim - (1 if ncomp > 1 else 0)
    axes = tuple(range(spatial))[::-1] + ((spatial,) if ncomp > 1 else ())
    arr = np.array(np.transpose(arr, axes))  # copy: detach from the SimpleITK buffer
    if dim == 2:
        arr = arr[:, :, None] if ncomp == 1 else arr[:, :, None, :]
    return img, arr


def _stem(path: str) -> str:
    name = os.path.basename(os.fspath(path))
    for suffix in (".seg.nrrd", ".nii.gz", ".nrrd", ".nii", ".mha", ".mhd", ".nhdr", ".h5"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


@contextlib.contextmanager
def _writing(path: str) -> Iterator[str]:
    """:func:`semiseg.atomic.atomic_path` for the image writers, whose failures become one line naming
    the file."""
    path = os.fspath(path)
    if _lower_name(path).endswith(_MULTI_FILE_SUFFIXES):
        raise SemiSegError(f"cannot write {path}: header/data file pairs are not supported, "
                           f"use a single-file format (.nrrd, .seg.nrrd, .nii.gz, .mha)")
    try:
        with atomic_path(path) as tmp:
            yield str(tmp)
    except SemiSegError:
        raise
    except Exception as exc:
        raise SemiSegError(f"cannot write {path}: {_short_reason(exc)}") from None


def _sitk_image(array: np.ndarray, geometry: Geometry):
    sitk = _sitk()
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"expected an (x, y, z) array, got shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    img.SetSpacing([float(s) for s in geometry.spacing])
    img.SetOrigin([float(o) for o in geometry.origin])
    img.SetDirection([float(d) for d in geometry.direction])
    return img


def _write_sitk(path: str, array: np.ndarray, geometry: Geometry) -> None:
    sitk = _sitk()
    img = _sitk_image(array, geometry)
    with _writing(path) as tmp:
        sitk.WriteImage(img, tmp, True)


def _label_dtype(max_value: int, path: str, signed_ok: bool = True) -> np.dtype:
    if max_value <= 255:
        return np.dtype(np.uint8)
    if signed_ok and max_value <= np.iinfo(np.int16).max:
        return np.dtype(np.int16)
    raise SemiSegError(f"label file {path} has label value {max_value}; at most 32767 is supported")


# ----------------------------------------------------------------------------------------------
# images

def read_volume(path) -> Volume:
    """Read an image (NRRD, NIfTI, MHA, ... anything SimpleITK reads) as float32 (x, y, z).

    2D images become volumes with z size 1 (and a 3D geometry). RGB(A) images are converted to
    grey by averaging the colour channels.
    """
    path = os.fspath(path)
    img, arr = _read_sitk(path, "image")
    if arr.ndim == 4:
        ncomp = arr.shape[-1]
        if ncomp in (3, 4):
            arr = arr[..., :3].astype(np.float32).mean(axis=-1)
        else:
            raise SemiSegError(f"cannot read image {path}: it has {ncomp} components per voxel, "
                               f"expected a scalar (grey-level) image")
    return Volume(arr.astype(np.float32, copy=False), _geometry_from_sitk(img), _stem(path))


def read_volume_header(path) -> tuple[tuple[int, int, int], Geometry]:
    """The (x, y, z) size and geometry :func:`read_volume` would give, from the header alone (no voxel
    data is read: planning looks at every unlabeled scan's grid but at none of its intensities)."""
    path = os.fspath(path)
    _check_readable(path, "image")
    reader = _sitk().ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except Exception as exc:
        raise SemiSegError(f"cannot read image {path}: {_short_reason(exc)}") from None
    dim = reader.GetDimension()
    if dim not in (2, 3):
        raise SemiSegError(f"cannot read image {path}: it has {dim} dimensions, expected a 2D or 3D image")
    size = tuple(int(n) for n in reader.GetSize()) + ((1,) if dim == 2 else ())
    return size, _geometry_from_sitk(reader)


def write_volume(path, volume: Volume) -> None:
    """Write a volume with SimpleITK (format from the extension), compressed, atomically."""
    _write_sitk(os.fspath(path), volume.array, volume.geometry)


# ----------------------------------------------------------------------------------------------
# labels

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


def read_label(path, classes: Sequence[ClassInfo] | None = None,
               mapping: dict | None = None) -> tuple[Volume, list[ClassInfo]]:
    """Read a labelmap (integer NRRD/NIfTI/MHA) or a Slicer segmentation (``.seg.nrrd``).

    Returns the labelmap (uint8, or int16 for values above 255) in (x, y, z) and its classes.

    * Slicer segmentation: segments of all layers are merged into one labelmap; each segment keeps its
      label value unless values collide across layers, then segments are numbered 1..N in file
      order. Classes come from segment names, values and colours. If ``classes`` is given, segments
      are matched to them by name (case-insensitive) and voxels get the matching class's value.
    * Plain labelmap: classes are ``class_<v>`` for each non-zero value present (palette colours),
      unless ``classes`` is given, in which case every value present must be one of theirs.
    * ``mapping`` (with ``classes``; made by :func:`match_label_classes`): the explicit output value of
      every segment (key: :func:`normalize_class_name` of its name) or label value (key: the int);
      0 drops it. Several sources may map to one value (merged).
    """
    path = os.fspath(path)
    _check_readable(path, "label file")
    if mapping is not None and classes is None:
        raise ValueError("read_label: a mapping needs the classes it maps to")
    if is_segmentation_file(path):
        return _read_segmentation(path, classes, mapping)
    return _read_labelmap(path, classes, mapping)


def _read_labelmap(path: str, classes: Sequence[ClassInfo] | None,
                   mapping: dict | None = None) -> tuple[Volume, list[ClassInfo]]:
    img, arr = _read_sitk(path, "label file")
    if arr.ndim == 4:
        raise SemiSegError(f"cannot read label file {path}: it has {arr.shape[-1]} components per voxel, "
                           f"expected a scalar labelmap")
    if not np.issubdtype(arr.dtype, np.integer):
        if arr.dtype == bool:
            arr = arr.astype(np.uint8)
        else:
            if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
                raise SemiSegError(f"label file {path} holds non-integer values; expected a labelmap")
            arr = np.round(arr).astype(np.int64)
    values = np.unique(arr)
    if values.size and values[0] < 0:
        raise SemiSegError(f"label file {path} holds negative label values (e.g. {int(values[0])})")
    max_value = int(values[-1]) if values.size else 0
    arr = arr.astype(_label_dtype(max_value, path), copy=False)
    present = [int(v) for v in values if v != 0]
    if mapping is not None:
        unknown = [v for v in present if v not in mapping]
        if unknown:
            raise SemiSegError(f"label file {path} holds label value(s) {', '.join(map(str, unknown))} "
                               f"that the class matching does not know (was the file changed?)")
        lut = np.zeros(max_value + 1, dtype=np.int64)
        for v in present:
            lut[v] = int(mapping[v])
        arr = lut[arr].astype(_label_dtype(int(lut.max(initial=0)), path), copy=False)
        out_classes = [ClassInfo(c.value, c.name, tuple(c.color)) for c in classes]
    elif classes is not None:
        known = {c.value for c in classes}
        unknown = [v for v in present if v not in known]
        if unknown:
            raise SemiSegError(f"label file {path} holds label value(s) {', '.join(map(str, unknown))} "
                               f"that are not among the classes ({_describe_classes(classes)})")
        out_classes = [ClassInfo(c.value, c.name, tuple(c.color)) for c in classes]
    else:
        out_classes = [ClassInfo(v, f"class_{v}", default_color(v)) for v in present]
    return Volume(arr, _geometry_from_sitk(img), _stem(path)), out_classes


def _describe_classes(classes: Sequence[ClassInfo]) -> str:
    return ", ".join(f"{c.value}: {c.name}" for c in classes) or "none"


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


def _read_segmentation(path: str, classes: Sequence[ClassInfo] | None,
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

    names = [str(s.get("name", s.get("id", f"segment {i + 1}"))) for i, s in enumerate(segments)]
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
        values = [int(s.get("labelValue", 1)) for s in segments]
        if len(set(values)) != len(values) or any(v <= 0 for v in values):
            values = list(range(1, len(segments) + 1))
        out_classes = []
        for s, name, v in zip(segments, names, values):
            color = s.get("color")
            color = tuple(float(c) for c in color[:3]) if color is not None and len(color) >= 3 else default_color(v)
            out_classes.append(ClassInfo(v, name, color))
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


def check_same_grid(image: Volume, label: Volume, image_path, label_path) -> None:
    """Raise SemiSegError if the label's voxel grid is not exactly the image's (never resamples)."""
    if tuple(image.shape[:3]) != tuple(label.shape[:3]) or not image.geometry.matches(label.geometry):
        raise SemiSegError(
            f"label {os.fspath(label_path)} does not share the grid of image {os.fspath(image_path)}: "
            f"image {image.geometry.describe(tuple(image.shape[:3]))} vs "
            f"label {label.geometry.describe(tuple(label.shape[:3]))}")


# ----------------------------------------------------------------------------------------------
# classes across label files

_DROP = ("background", "0")  # class_map targets that remove a source (its voxels become background)


def normalize_class_name(name) -> str:
    """The key segment names are matched by: case-insensitive, trimmed, inner whitespace collapsed."""
    return " ".join(str(name).split()).casefold()


def parse_class_map(spec) -> dict[str, str]:
    """``class_map`` option -> {normalised source: canonical class name}.

    ``spec`` is ``"source=class; source=class"`` (``;`` or new lines between entries), a JSON object
    ``{"source": "class"}`` given inline or as a ``.json`` file path, or a dict. A source is a segment
    name (matched case-insensitively) or a label value of a plain labelmap (``"4=kidney"``); the class
    ``background`` (or ``0``) drops that source.
    """
    if spec is None or spec == "" or spec == {}:
        return {}
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        text = str(spec).strip()
        source = "class_map"
        if not text.startswith("{") and text.lower().endswith(".json"):
            if not os.path.isfile(os.path.expanduser(text)):
                raise SemiSegError(f"class_map file not found: {text}")
            source = os.path.expanduser(text)
            with open(source) as f:
                text = f.read().strip()
        if text.startswith("{"):
            import json
            try:
                obj = json.loads(text)
            except ValueError as exc:
                raise SemiSegError(f"cannot parse {source} as JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise SemiSegError(f"{source} must be a JSON object mapping source names to classes")
            items = list(obj.items())
        else:
            items = []
            for entry in re.split(r"[;\n]", text):
                if not entry.strip():
                    continue
                if "=" not in entry:
                    raise SemiSegError(f"class_map entry '{entry.strip()}' is not 'source=class'")
                src, _, dst = entry.rpartition("=")
                items.append((src, dst))
    out: dict[str, str] = {}
    for src, dst in items:
        key, target = normalize_class_name(src), " ".join(str(dst).split())
        if not key or not target:
            raise SemiSegError(f"class_map entry '{str(src).strip()}={str(dst).strip()}' has an empty side")
        if key in out and normalize_class_name(out[key]) != normalize_class_name(target):
            raise SemiSegError(f"class_map maps '{str(src).strip()}' twice: to '{out[key]}' and to '{target}'")
        out[key] = target
    return out


def label_file_classes(path) -> tuple[str, list[ClassInfo]]:
    """The classes one label file holds, as :func:`read_label` would return them without ``classes``:
    ``("segments", ...)`` for a Slicer segmentation (from its header only) or ``("values", ...)`` for a
    plain labelmap (the non-zero values present; this reads the voxels)."""
    path = os.fspath(path)
    _check_readable(path, "label file")
    if not is_segmentation_file(path):
        return "values", _read_labelmap(path, None)[1]
    import slicerio
    try:
        seg = slicerio.read_segmentation(path, skip_voxels=True)
    except Exception as exc:
        raise SemiSegError(f"cannot read segmentation {path}: {_short_reason(exc)}") from None
    segments = list(seg.get("segments") or [])
    values = [int(s.get("labelValue", 1)) for s in segments]
    if len(set(values)) != len(values) or any(v <= 0 for v in values):
        values = list(range(1, len(segments) + 1))  # as _read_segmentation numbers them
    out = []
    for i, (s, v) in enumerate(zip(segments, values)):
        color = s.get("color")
        color = tuple(float(c) for c in color[:3]) if color is not None and len(color) >= 3 else default_color(v)
        out.append(ClassInfo(v, str(s.get("name", s.get("id", f"segment {i + 1}"))), color))
    return "segments", out


def _quoted(names) -> str:
    return ", ".join(f"'{n}'" for n in names)


def match_label_classes(files, class_map=None) -> tuple[list[ClassInfo], dict[str, dict]]:
    """Match the classes of several label files; returns (classes, {path: mapping for read_label}).

    ``files``: label file paths, or (path, kind, classes) triples from :func:`label_file_classes`.
    Rules: ``class_map`` (see :func:`parse_class_map`) renames sources first. Slicer segmentations are
    matched by segment name (case-insensitive): the first one is the reference and every other must
    hold exactly its names, else a one-line SemiSegError names both files and the differing names.
    Plain labelmaps are matched by label value: to the reference segmentation's values, or, when the
    data set has labelmaps only, the classes are the union of the values present (``class_<v>`` unless
    renamed). The resulting classes are numbered 1..K in the order of their source values (the
    network's output channels), so non-contiguous source values are renumbered.
    """
    cmap = parse_class_map(class_map)
    scans = [(os.fspath(f[0]), f[1], list(f[2])) if isinstance(f, tuple) else (os.fspath(f), *label_file_classes(f))
             for f in files]
    if not scans:
        return [], {}
    hint = "; fix it with the class_map option (e.g. --class-map 'source name=class name')"

    def seg_entries(classes):
        """[(key, canonical name or None if dropped, source value, colour)] of a segmentation."""
        out = []
        for c in classes:
            target = cmap.get(normalize_class_name(c.name), c.name)
            out.append((normalize_class_name(c.name), None if target.casefold() in _DROP else target, c.value, c.color))
        return out

    def value_target(v):
        t = cmap.get(str(int(v)))
        return t, (t is not None and t.casefold() in _DROP)

    # canonical classes: [name, source value, colour]; key = normalised name
    canon: dict[str, list] = {}
    ref = next((sc for sc in scans if sc[1] == "segments"), None)
    if ref is not None:
        ref_path = ref[0]
        for key, target, value, color in seg_entries(ref[2]):
            if target is not None and normalize_class_name(target) not in canon:
                canon[normalize_class_name(target)] = [target, value, color]
    else:
        ref_path = None
        for _, _, file_classes in scans:
            for c in file_classes:
                t, drop = value_target(c.value)
                if drop:
                    continue
                name = t if t is not None else f"class_{c.value}"
                entry = canon.setdefault(normalize_class_name(name), [name, c.value, default_color(c.value)])
                entry[1] = min(entry[1], c.value)
    order = sorted(canon, key=lambda k: (canon[k][1], list(canon).index(k)))
    classes = [ClassInfo(i + 1, canon[k][0], tuple(canon[k][2])) for i, k in enumerate(order)]
    value_of = {k: i + 1 for i, k in enumerate(order)}
    ref_entries = seg_entries(ref[2]) if ref is not None else []
    # a segmentation reference's source label value -> output value (labelmaps are matched by value)
    ref_value = {v: (value_of[normalize_class_name(t)] if t is not None else 0) for _, t, v, _ in ref_entries}
    ref_name_of_value = {v: t for _, t, v, _ in ref_entries if t is not None}

    mappings: dict[str, dict] = {}
    for path, kind, file_classes in scans:
        mapping: dict = {}
        if kind == "segments":  # then ref is a segmentation: match by (mapped) name
            entries = seg_entries(file_classes)
            have = {normalize_class_name(t): t for _, t, _, _ in entries if t is not None}
            missing = [canon[k][0] for k in order if k not in have]
            extra = [t for k, t in have.items() if k not in canon]
            if missing or extra:
                parts = []
                if missing:
                    parts.append(f"{path} lacks {_quoted(missing)} which {ref_path} has")
                if extra:
                    parts.append(f"{path} has {_quoted(extra)} which {ref_path} lacks")
                for _, t, v, _ in entries:  # same value, other name: the likely renaming
                    if t is not None and normalize_class_name(t) not in canon and v in ref_name_of_value \
                            and normalize_class_name(ref_name_of_value[v]) not in have:
                        parts.append(f"value {v} is '{ref_name_of_value[v]}' in {ref_path} but '{t}' in {path}")
                raise SemiSegError(f"label files disagree on the classes: {'; '.join(parts)}{hint}")
            for key, target, _, _ in entries:
                mapping[key] = value_of[normalize_class_name(target)] if target is not None else 0
        else:
            for c in file_classes:
                t, drop = value_target(c.value)
                if drop:
                    mapping[c.value] = 0
                elif t is not None:
                    if normalize_class_name(t) not in value_of:
                        raise SemiSegError(f"class_map maps label value {c.value} of {path} to '{t}', which is not "
                                           f"a class of {ref_path} ({_describe_classes(classes)})")
                    mapping[c.value] = value_of[normalize_class_name(t)]
                elif ref is None:
                    mapping[c.value] = value_of[normalize_class_name(f"class_{c.value}")]
                elif c.value in ref_value:
                    mapping[c.value] = ref_value[c.value]
                else:
                    raise SemiSegError(f"label files disagree on the classes: label value {c.value} in {path} is "
                                       f"none of the values of {ref_path} ({_describe_classes(ref[2])}){hint}")
        mappings[path] = mapping
    return classes, mappings


def _checked_labelmap(labelmap: np.ndarray, path: str) -> np.ndarray:
    labelmap = np.asarray(labelmap)
    if labelmap.ndim != 3:
        raise ValueError(f"expected an (x, y, z) labelmap, got shape {labelmap.shape}")
    if labelmap.dtype == bool:
        return labelmap.astype(np.uint8)
    if not np.issubdtype(labelmap.dtype, np.integer):
        if not np.all(np.isfinite(labelmap)) or np.any(labelmap != np.round(labelmap)):
            raise SemiSegError(f"cannot write labelmap {path}: it holds non-integer values")
    lo = labelmap.min(initial=0)
    hi = int(labelmap.max(initial=0))
    if lo < 0:
        raise SemiSegError(f"cannot write labelmap {path}: it holds negative values")
    if hi > 65535:
        raise SemiSegError(f"cannot write labelmap {path}: label value {hi} exceeds 65535")
    return labelmap.astype(np.uint8 if hi <= 255 else np.uint16, copy=False)


def write_labelmap(path, labelmap: np.ndarray, geometry: Geometry) -> None:
    """Write an (x, y, z) labelmap (uint8, or uint16 for values above 255), compressed, atomically."""
    path = os.fspath(path)
    _write_sitk(path, _checked_labelmap(labelmap, path), geometry)


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
