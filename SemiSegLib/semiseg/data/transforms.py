"""Tensor transforms: resizing as the literature does it, intensity normalisation, and the training augmentations
of SSL4MIS ``code/dataloaders/dataset.py`` (RandomGenerator) and UA-MT ``code/dataloaders/la_heart.py``
(RandomRotFlip, RandomCrop), drawn from an explicit ``torch.Generator`` (saved in checkpoints, so a resumed run
draws the same augmentations)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def zoom_nearest(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Nearest-neighbour resize of the last ``len(size)`` axes, identical to
    ``scipy.ndimage.zoom(order=0)`` (which maps output index i to input i·(n_in-1)/(n_out-1), rounded)."""
    out = x
    nd = len(size)
    for axis, n_out in enumerate(size):
        dim = out.dim() - nd + axis
        n_in = out.shape[dim]
        if n_in == n_out:
            continue
        if n_out == 1:
            idx = torch.zeros(1, dtype=torch.long, device=x.device)
        else:
            # scipy computes in double precision and rounds half up (floor(c + 0.5))
            c = torch.arange(n_out, dtype=torch.float64, device=x.device) * ((n_in - 1) / (n_out - 1))
            idx = torch.floor(c + 0.5).long().clamp_(0, n_in - 1)
        out = out.index_select(dim, idx)
    return out


def resize_image(x: torch.Tensor, size: tuple[int, ...], mode: str) -> torch.Tensor:
    """``nearest`` (SSL4MIS: scipy zoom order 0) or ``bilinear`` (UniMatch/AGP) resize of (B, C, *S)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if mode == "nearest":
        return zoom_nearest(x, size)
    if mode == "bilinear":
        return F.interpolate(x, size=size, mode="bilinear" if len(size) == 2 else "trilinear", align_corners=False)
    raise ValueError(f"unknown resize mode '{mode}' (nearest or bilinear)")


def normalize(image: np.ndarray, mode: str) -> np.ndarray:
    """Per-volume intensity normalisation: ``none`` (pre-normalised benchmark files), ``zscore``, ``minmax``."""
    image = image.astype(np.float32, copy=False)
    if mode == "none":
        return image
    if mode == "zscore":
        return (image - image.mean()) / max(float(image.std()), 1e-8)
    if mode == "minmax":
        lo, hi = float(image.min()), float(image.max())
        return (image - lo) / max(hi - lo, 1e-8)
    raise ValueError(f"unknown normalization '{mode}' (none, zscore, minmax)")


# ------------------------------------------------------------------------------------ 2D (ACDC)
def random_generator_2d(image: torch.Tensor, label: torch.Tensor | None, gen: torch.Generator,
                        max_angle: int = 20, aspect: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SSL4MIS ``RandomGenerator`` on a batch already at training size (B, 1, X, Y), per sample:
    p=0.5 rot90·k + flip along a random axis; else p=0.5 rotation by an integer angle in
    [-20, 19] degrees (nearest, same size); else unchanged. ``aspect`` (B,): each slice's native
    ``(H-1)/(W-1)``, so the rotation is the reference's, made at native size before the zoom."""
    b = image.shape[0]
    u1 = torch.rand(b, generator=gen)
    u2 = torch.rand(b, generator=gen)
    k = torch.randint(0, 4, (b,), generator=gen)
    axis = torch.randint(0, 2, (b,), generator=gen)
    angle = torch.randint(-max_angle, max_angle, (b,), generator=gen)
    image, label = image.clone(), (label.clone() if label is not None else None)
    rotate = []
    for i in range(b):
        if u1[i] > 0.5:
            image[i] = torch.flip(torch.rot90(image[i], int(k[i]), (1, 2)), (1 + int(axis[i]),))
            if label is not None:
                label[i] = torch.flip(torch.rot90(label[i], int(k[i]), (0, 1)), (int(axis[i]),))
        elif u2[i] > 0.5:
            rotate.append(i)
    if rotate:
        idx = torch.tensor(rotate)
        asp = aspect[idx] if aspect is not None else None
        image[idx] = rotate_nearest(image[idx], angle[idx].float(), asp)
        if label is not None:
            label[idx] = rotate_nearest(label[idx].unsqueeze(1).float(), angle[idx].float(), asp).squeeze(1).to(label.dtype)
    return image, label


def rotate_nearest(x: torch.Tensor, degrees: torch.Tensor, aspect: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate (B, C, X, Y) about the array centre by per-sample angles, nearest, zero fill
    (scipy.ndimage.rotate(order=0, reshape=False) semantics: pixel centres, same size).

    ``aspect`` (B,): the ``(X-1)/(Y-1)`` of the grid whose pixels the rotation is isotropic in (default:
    this array's). The references rotate a slice at its native size and then zoom it to the training
    size; zooming keeps normalised coordinates, so rotating the zoomed slice with its native aspect is the
    same map (up to nearest sampling), while rotating it as a square would shear a non-square slice."""
    theta = degrees * math.pi / 180
    cos, sin = torch.cos(theta), torch.sin(theta)
    h, w = x.shape[-2:]
    if aspect is None:
        aspect = torch.full_like(theta, (h - 1) / (w - 1) if h > 1 and w > 1 else 1.0)
    aspect = aspect.to(theta)
    # affine_grid works in normalised coordinates; rescale so rotation is isotropic in pixels
    mat = torch.zeros(x.shape[0], 2, 3, dtype=x.dtype, device=x.device)
    mat[:, 0, 0] = cos
    mat[:, 0, 1] = -sin * aspect  # affine_grid's first output coordinate runs along Y
    mat[:, 1, 0] = sin / aspect
    mat[:, 1, 1] = cos
    grid = F.affine_grid(mat.to(x.device), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=True)


# ------------------------------------------------------------------------------------ 3D (LA)
def random_rot_flip_3d(image: torch.Tensor, label: torch.Tensor | None, gen: torch.Generator):
    """UA-MT ``RandomRotFlip`` on one (X, Y, Z) volume: rot90·k in the x-y plane, then flip along x or y."""
    k = int(torch.randint(0, 4, (1,), generator=gen))
    axis = int(torch.randint(0, 2, (1,), generator=gen))
    image = torch.flip(torch.rot90(image, k, (0, 1)), (axis,))
    if label is not None:
        label = torch.flip(torch.rot90(label, k, (0, 1)), (axis,))
    return image, label


def random_crop_3d(image: torch.Tensor, label: torch.Tensor | None, patch: tuple[int, int, int],
                   gen: torch.Generator):
    """UA-MT ``RandomCrop``: when any side is not larger than the patch, pad every axis by
    ``max((P - S) // 2 + 3, 0)`` on both sides (zeros), then crop at a uniform random offset."""
    pads = ua_mt_crop_pads(tuple(image.shape), patch)
    if any(pads):
        spec = []
        for p in reversed(pads):
            spec += [p, p]
        image = F.pad(image, spec)
        if label is not None:
            label = F.pad(label, spec)
    starts = [int(torch.randint(0, s - p + 1, (1,), generator=gen)) for s, p in zip(image.shape, patch)]
    sl = tuple(slice(st, st + p) for st, p in zip(starts, patch))
    return image[sl], (label[sl] if label is not None else None)


# ------------------------------------------------------------------------------------ batched versions
# The functions above are the per-sample REFERENCE implementations (kept for tests and as the
# definition). The classes below apply the very same transforms to a whole batch in a few tensor
# operations on the device holding the data; their random parameters are drawn on the CPU
# generator with the same calls in the same order as the references, so the batches are identical.

def draw_random_generator_2d(b: int, gen: torch.Generator, max_angle: int = 20) -> torch.Tensor:
    """The draws of :func:`random_generator_2d` for ``b`` samples, as one transform code per sample:
    0 = unchanged, 1 + 2·k + axis = rot90·k then flip, 9 + angle + max_angle = rotation by ``angle``."""
    u1 = torch.rand(b, generator=gen)
    u2 = torch.rand(b, generator=gen)
    k = torch.randint(0, 4, (b,), generator=gen)
    axis = torch.randint(0, 2, (b,), generator=gen)
    angle = torch.randint(-max_angle, max_angle, (b,), generator=gen)
    return torch.where(u1 > 0.5, 1 + 2 * k + axis,
                       torch.where(u2 > 0.5, 9 + angle + max_angle, torch.zeros_like(k)))


class BatchedRandomGenerator2D:
    """:func:`random_generator_2d` for a whole batch: every possible transform (identity, 8 rot90/flip,
    2·max_angle nearest rotations) is precomputed once as a pixel-index map on the CPU with the
    reference operations, so a batch is one table lookup and one ``gather`` on the data's device."""

    def __init__(self, size: tuple[int, int], device: torch.device | str = "cpu", max_angle: int = 20):
        x, y = size
        n = x * y
        if x != y:
            raise ValueError(f"2D training size {tuple(size)} must be square (rot90 augmentation)")
        if n + 1 >= 2 ** 24:
            raise ValueError(f"2D training size {tuple(size)} too large for the float32 index maps")
        self.size, self.max_angle = (x, y), max_angle
        idx = (torch.arange(n, dtype=torch.float32) + 1).reshape(x, y)  # 0 = zero fill
        self.index_map = idx.to(device)
        maps = [idx] + [torch.flip(torch.rot90(idx, k, (0, 1)), (a,)) for k in range(4) for a in range(2)]
        angles = torch.arange(-max_angle, max_angle, dtype=torch.float32)
        rot = rotate_nearest(idx.expand(len(angles), 1, x, y).contiguous(), angles)[:, 0]
        table = torch.cat([torch.stack(maps), rot]).reshape(-1, n)
        self.table = table.round().long().to(device)  # (49 + ..., n): 0 = zero fill, else 1 + source pixel

    def draw(self, b: int, gen: torch.Generator) -> torch.Tensor:
        return draw_random_generator_2d(b, gen, self.max_angle)

    def apply(self, image: torch.Tensor, label: torch.Tensor | None, code: torch.Tensor):
        """(B, 1, X, Y) image, (B, X, Y) label or None, (B,) codes on the data's device: the batch laid
        out as a store (a zero column first) and transformed by :meth:`apply_indexed`."""
        b = image.shape[0]

        def with_zero(t):
            return torch.cat([t.new_zeros(b, 1), t.reshape(b, -1)], 1)
        return self.apply_indexed(with_zero(image), with_zero(label) if label is not None else None,
                                  torch.arange(b, device=image.device), code.to(self.table.device))

    def apply_indexed(self, images: torch.Tensor, labels: torch.Tensor | None, idx: torch.Tensor, code: torch.Tensor,
                      aspect: torch.Tensor | None = None):
        """The same on a store laid out as (N, 1 + X·Y) with a zero in column 0: the slices ``idx`` are
        copied out (contiguous rows) and transformed with one ``gather`` each. ``aspect`` (N,): the slices'
        native ``(H-1)/(W-1)``; the angle rotations of non-square slices get their own index maps."""
        m = self.table.index_select(0, code)
        if aspect is not None:
            asp = aspect.index_select(0, idx)
            own = ((code >= 9) & (asp != 1)).nonzero()[:, 0]
            if len(own):
                angles = (code.index_select(0, own) - 9 - self.max_angle).float()
                maps = rotate_nearest(self.index_map.expand(len(own), 1, *self.size).contiguous(), angles,
                                      asp.index_select(0, own))
                m = m.clone()
                m[own] = maps.reshape(len(own), -1).round().long()
        b = len(idx)
        out = images.index_select(0, idx).gather(1, m).reshape(b, 1, *self.size)
        lab = labels.index_select(0, idx).gather(1, m).reshape(b, *self.size) if labels is not None else None
        return out, lab


def rot_flip_source_map(k: int, axis: int, x: int, y: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Where ``flip(rot90(v, k, (0, 1)), axis)[i, j]`` reads ``v``: source x = c + a·i + b·j and
    source y = c' + a'·i + b'·j, returned as ((c, a, b), (c', a', b')) for a volume of x-y size (x, y)."""
    sr = (x, y) if k % 2 == 0 else (y, x)
    # flip in the rotated frame: (i, j) -> (i0, j0)
    i0 = (sr[0] - 1, -1, 0) if axis == 0 else (0, 1, 0)
    j0 = (0, 0, 1) if axis == 0 else (sr[1] - 1, 0, -1)

    def neg(e, c):  # c - e
        return (c - e[0], -e[1], -e[2])
    k %= 4
    if k == 0:
        return i0, j0
    if k == 1:
        return j0, neg(i0, y - 1)
    if k == 2:
        return neg(i0, x - 1), neg(j0, y - 1)
    return neg(j0, x - 1), i0


def ua_mt_crop_pads(shape: tuple[int, ...], patch: tuple[int, ...]) -> list[int]:
    """Per-axis padding of UA-MT ``RandomCrop`` (:func:`random_crop_3d` and the batched crops): none when
    every side is larger than the patch, else ``max((P - S) // 2 + 3, 0)`` on both sides of every axis."""
    if any(s <= p for s, p in zip(shape, patch)):
        return [max((p - s) // 2 + 3, 0) for s, p in zip(shape, patch)]
    return [0] * len(shape)
