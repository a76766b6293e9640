"""A volume: a voxel array in (i, j, k) = (x, y, z) index order plus its physical geometry.

Every array in the engine uses ITK's index order (the order of slicerio's ``voxels`` and of the
LA ``.h5`` files), so patch sizes read like the literature's ``112x112x80``. 2D networks see
(x, y) planes and slice along the last axis. Geometry follows ITK/DICOM LPS conventions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Geometry:
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0)
    origin: tuple[float, ...] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # row-major 3x3

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping voxel indices to LPS millimetres."""
        d = np.asarray(self.direction, dtype=float).reshape(3, 3)
        m = np.eye(4)
        m[:3, :3] = d * np.asarray(self.spacing, dtype=float)[None, :]
        m[:3, 3] = self.origin
        return m

    @classmethod
    def from_ijk_to_lps(cls, matrix: np.ndarray) -> "Geometry":
        m = np.asarray(matrix, dtype=float)
        spacing = np.linalg.norm(m[:3, :3], axis=0)
        direction = m[:3, :3] / spacing[None, :]
        return cls(tuple(spacing.tolist()), tuple(m[:3, 3].tolist()), tuple(direction.ravel().tolist()))

    def matches(self, other: "Geometry", tol: float = 1e-4) -> bool:
        return (np.allclose(self.spacing, other.spacing, atol=tol)
                and np.allclose(self.origin, other.origin, atol=tol * 10)
                and np.allclose(self.direction, other.direction, atol=tol))

    def describe(self, shape: tuple[int, ...] | None = None) -> str:
        fmt = lambda v: "(" + ", ".join(f"{x:g}" for x in v) + ")"  # noqa: E731
        size = f"size {fmt(shape)} " if shape is not None else ""
        return f"{size}spacing {fmt(self.spacing)} origin {fmt(self.origin)} direction {fmt(self.direction)}"

    def to_dict(self) -> dict:
        return {"spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(tuple(d["spacing"]), tuple(d["origin"]), tuple(d["direction"]))


@dataclass
class Volume:
    array: np.ndarray  # (x, y, z)
    geometry: Geometry = field(default_factory=Geometry)
    name: str = ""
    spacing_known: bool = True  # False for the benchmark .h5 files, which store no spacing

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


@dataclass
class ClassInfo:
    """One segmentation class: label value in the labelmap, segment name and RGB colour in [0, 1]."""
    value: int
    name: str
    color: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def to_dict(self) -> dict:
        return {"value": self.value, "name": self.name, "color": list(self.color)}

    @classmethod
    def from_dict(cls, d: dict) -> "ClassInfo":
        return cls(int(d["value"]), str(d["name"]), tuple(d.get("color", (0.5, 0.5, 0.5))))
