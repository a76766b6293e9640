"""Reading and writing images and labelmaps (NRRD, NIfTI, MHA, ... through SimpleITK).

Slicer segmentations (``.seg.nrrd``) are :mod:`semiseg.data.segfile`; reading a label file of either
kind in terms of a class table, and matching classes across files, is :mod:`semiseg.data.classes`.

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
    "DEFAULT_PALETTE", "default_color", "read_volume", "read_image_header", "read_volume_header", "read_labelmap", "check_same_grid",
    "write_volume", "write_labelmap",
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
    if path.lower().endswith(".gz"):
        _check_gzip(path, what)
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


def _check_gzip(path: str, what: str) -> None:
    """A gzip file (``.nii.gz``) must decompress to its end with a matching checksum: ITK's NIfTI reader
    fills the voxels a truncated file lacks with zeros and reports nothing."""
    import gzip
    import zlib
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        raise SemiSegError(f"cannot read {what} {path}: damaged gzip data ({_short_reason(exc)})") from None


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


def read_image_header(path) -> tuple[tuple[int, int, int], Geometry, int, int]:
    """``(size, geometry, dimension, components)`` of an image from its header alone (no voxel data is
    read): the (x, y, z) size and geometry :func:`read_volume` would give (a 2D image has z size 1), the
    file's own dimension (2 or 3) and its components per voxel (1 for a grey-level image)."""
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
    return size, _geometry_from_sitk(reader), dim, int(reader.GetNumberOfComponents())


def read_volume_header(path) -> tuple[tuple[int, int, int], Geometry]:
    """The (x, y, z) size and geometry :func:`read_volume` would give (planning looks at every unlabeled
    scan's grid but at none of its intensities)."""
    size, geometry, _, _ = read_image_header(path)
    return size, geometry


def write_volume(path, volume: Volume) -> None:
    """Write a volume with SimpleITK (format from the extension), compressed, atomically."""
    _write_sitk(os.fspath(path), volume.array, volume.geometry)


# ----------------------------------------------------------------------------------------------
# labelmaps (Slicer segmentations: semiseg.data.segfile; a label file in a class table: semiseg.data.classes)


def read_labelmap(path: str, classes: Sequence[ClassInfo] | None = None,
                  mapping: dict | None = None) -> tuple[Volume, list[ClassInfo]]:
    """A plain labelmap and its classes (see :func:`semiseg.data.classes.read_label`)."""
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


def check_same_grid(image: Volume, label: Volume, image_path, label_path) -> None:
    """Raise SemiSegError if the label's voxel grid is not exactly the image's (never resamples)."""
    if tuple(image.shape[:3]) != tuple(label.shape[:3]) or not image.geometry.matches(label.geometry):
        raise SemiSegError(
            f"label {os.fspath(label_path)} does not share the grid of image {os.fspath(image_path)}: "
            f"image {image.geometry.describe(tuple(image.shape[:3]))} vs "
            f"label {label.geometry.describe(tuple(label.shape[:3]))}")




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


