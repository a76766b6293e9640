"""Resampling along each image's own index axes (its direction matrix kept, orientation never assumed).

* :func:`target_grid`: the grid with (about) a target spacing that covers exactly the same physical
  extent as the input: the size is ``round(size * spacing / target)``, the spacing is then adjusted to
  ``size * spacing / new_size`` so the outer voxel faces stay where they were, and the origin moves by
  half a voxel difference along each axis's direction. Axes whose target is ``None`` keep their grid.
* :func:`resample_image`: images, linear or B-spline (SimpleITK, nearest-neighbour extrapolation at the
  outer half voxel).
* :func:`resample_label`: labelmaps, nearest or one-hot linear (each label value's indicator resampled
  linearly, then the arg-max; ties go to the lower value).
* The same two functions map back onto an exact original grid (spacing, origin, direction, size): pass
  that grid as the output geometry and shape.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..data.volume import Geometry

IMAGE_INTERPOLATIONS = ("linear", "bspline")
LABEL_INTERPOLATIONS = ("nearest", "linear")


def _sitk():
    import SimpleITK as sitk
    return sitk


def target_grid(geometry: Geometry, shape: Sequence[int], target: Sequence[float | None]
                ) -> tuple[Geometry, tuple[int, ...]]:
    """(geometry, shape) of the resampled grid: same extent and direction, spacing close to ``target``."""
    spacing = np.asarray(geometry.spacing, dtype=float)
    shape = np.asarray(shape[:3], dtype=int)
    new_shape, new_spacing = shape.copy(), spacing.copy()
    for a in range(3):
        t = target[a] if a < len(target) else None
        if t is None or shape[a] <= 1 or t <= 0:
            continue
        n = max(int(round(shape[a] * spacing[a] / float(t))), 1)
        new_shape[a] = n
        new_spacing[a] = shape[a] * spacing[a] / n
    d = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    # the corner of voxel 0 (origin - D s/2) stays fixed: origin' = origin + D (s' - s) / 2
    origin = np.asarray(geometry.origin, dtype=float) + d @ ((new_spacing - spacing) / 2)
    return (Geometry(tuple(new_spacing.tolist()), tuple(origin.tolist()), tuple(float(v) for v in geometry.direction)),
            tuple(int(n) for n in new_shape))


def same_grid(g1: Geometry, s1: Sequence[int], g2: Geometry, s2: Sequence[int]) -> bool:
    return tuple(s1[:3]) == tuple(s2[:3]) and np.allclose(g1.spacing, g2.spacing, rtol=0, atol=1e-9) \
        and np.allclose(g1.origin, g2.origin, rtol=0, atol=1e-7) and np.allclose(g1.direction, g2.direction, atol=1e-9)


def _to_sitk(array: np.ndarray, geometry: Geometry, vector: bool = False):
    sitk = _sitk()
    if vector:  # (C, x, y, z) -> sitk vector image with C components
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (3, 2, 1, 0))), isVector=True)
    else:
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    img.SetSpacing([float(s) for s in geometry.spacing])
    img.SetOrigin([float(o) for o in geometry.origin])
    img.SetDirection([float(v) for v in geometry.direction])
    return img


def _resample(img, out_geometry: Geometry, out_shape: Sequence[int], interpolator):
    sitk = _sitk()
    f = sitk.ResampleImageFilter()
    f.SetSize([int(n) for n in out_shape[:3]])
    f.SetOutputSpacing([float(s) for s in out_geometry.spacing])
    f.SetOutputOrigin([float(o) for o in out_geometry.origin])
    f.SetOutputDirection([float(v) for v in out_geometry.direction])
    f.SetInterpolator(interpolator)
    f.SetDefaultPixelValue(0)
    f.SetUseNearestNeighborExtrapolator(True)
    f.SetTransform(sitk.Transform())
    return f.Execute(img)


def resample_image(array: np.ndarray, geometry: Geometry, out_geometry: Geometry, out_shape: Sequence[int],
                   interpolation: str = "linear") -> np.ndarray:
    """float32 (x, y, z) image resampled onto the output grid."""
    sitk = _sitk()
    if interpolation not in IMAGE_INTERPOLATIONS:
        raise ValueError(f"image interpolation must be one of {IMAGE_INTERPOLATIONS}, not '{interpolation}'")
    array = np.asarray(array, dtype=np.float32)
    if same_grid(geometry, array.shape, out_geometry, out_shape):
        return array.copy()
    interp = sitk.sitkLinear if interpolation == "linear" else sitk.sitkBSpline
    out = _resample(_to_sitk(array, geometry), out_geometry, out_shape, interp)
    return np.ascontiguousarray(np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))).astype(np.float32, copy=False)


def resample_label(array: np.ndarray, geometry: Geometry, out_geometry: Geometry, out_shape: Sequence[int],
                   interpolation: str = "linear", values: Sequence[int] | None = None) -> np.ndarray:
    """Integer (x, y, z) labelmap resampled onto the output grid (``nearest`` or one-hot ``linear``)."""
    sitk = _sitk()
    if interpolation not in LABEL_INTERPOLATIONS:
        raise ValueError(f"label interpolation must be one of {LABEL_INTERPOLATIONS}, not '{interpolation}'")
    array = np.asarray(array)
    if same_grid(geometry, array.shape, out_geometry, out_shape):
        return array.copy()
    if interpolation == "nearest":
        out = _resample(_to_sitk(array, geometry), out_geometry, out_shape, sitk.sitkNearestNeighbor)
        return np.ascontiguousarray(np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))).astype(array.dtype, copy=False)
    vals = np.unique(np.concatenate([[0], np.unique(array)] + ([np.asarray(values)] if values is not None else [])))
    onehot = np.stack([(array == v) for v in vals]).astype(np.float32)  # (C, x, y, z)
    out = _resample(_to_sitk(onehot, geometry, vector=True), out_geometry, out_shape, sitk.sitkLinear)
    probs = np.transpose(sitk.GetArrayFromImage(out), (3, 2, 1, 0))  # (C, x, y, z)
    return np.ascontiguousarray(vals[np.argmax(probs, axis=0)].astype(array.dtype, copy=False))
