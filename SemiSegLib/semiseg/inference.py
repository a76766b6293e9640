"""Inference as in SSL4MIS ``code/val_2D.py`` (2D) and SS-Net ``code/utils/test_3d_patch.py`` (3D): 2D slice-wise
with resize to the training size and back, 3D sliding
window with overlap averaging, optional largest-connected-component post-processing, and optional test-time
augmentation (SemiSeg's: the references predict once per slice or window)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .data.transforms import normalize, resize_image, zoom_nearest
from .errors import SemiSegError
from .ops import argmax


def _autocast(device: torch.device, half: bool):
    if half and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return torch.autocast(device.type, enabled=False)


# Test-time augmentation: the network's softmax averaged over views of its input in the x-y plane (dims 2, 3 of
# (B, C, X, Y[, Z])), each mapped back. ``reflections`` are the orientations the 2D and 3D training augmentation
# of the references produces (SSL4MIS ``RandomGenerator`` and UA-MT ``RandomRotFlip``: rot90 by k, then always a
# flip, i.e. the four reflections of the square, never a pure rotation) plus the upright view; ``flips`` the
# upright view and a flip along x and along y. Rotations by 90/180/270 degrees are left out on purpose: the
# network never saw them (on ACDC they lowered the Dice).
TTA_MODES = ("none", "flips", "reflections")


def check_tta(mode: str) -> str:
    """``mode`` if it is one of :data:`TTA_MODES` (a user's override of a model's setting), else one line."""
    if mode not in TTA_MODES:
        raise SemiSegError(f"unknown test-time augmentation '{mode}' (one of: {', '.join(TTA_MODES)})")
    return mode


def _transpose(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(2, 3)


def _anti_transpose(t: torch.Tensor) -> torch.Tensor:
    return t.flip(2, 3).transpose(2, 3)


def _anti_transpose_inverse(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(2, 3).flip(2, 3)


def tta_views(mode: str, square: bool) -> list[tuple]:
    """(view, inverse) pairs of ``mode``; the transposes of ``reflections`` need a square x-y plane and are
    left out on a rectangular one (3D patches; 2D training sizes are square)."""
    def flip(d):
        return lambda t: t.flip(d)
    identity = (lambda t: t, lambda t: t)
    if mode in ("", "none"):
        return [identity]
    if mode not in TTA_MODES:
        raise ValueError(f"unknown test-time augmentation '{mode}' ({', '.join(TTA_MODES)})")
    views = [identity, (flip(2), flip(2)), (flip(3), flip(3))]
    if mode == "reflections" and square:
        views += [(_transpose, _transpose), (_anti_transpose, _anti_transpose_inverse)]
    return views


def network_probs(net: torch.nn.Module, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Softmax of ``net`` on ``x`` (float32), averaged over the test-time augmentation's views."""
    views = tta_views(tta, x.shape[2] == x.shape[3])
    probs = None
    for view, inverse in views:
        p = inverse(torch.softmax(net(view(x)).float(), 1))
        probs = p if probs is None else probs + p
    return probs / len(views) if len(views) > 1 else probs


def network_logits(net: torch.nn.Module, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """The network's logits; with test-time augmentation the log of the averaged softmax (same argmax and
    softmax as the average, and upsampled as logits are)."""
    if tta in ("", "none"):
        return net(x).float()
    return torch.log(network_probs(net, x, tta).clamp_min(1e-12))


@torch.no_grad()
def predict_2d(net: torch.nn.Module, image: np.ndarray, size: tuple[int, int], resize: str = "nearest",
               batch: int = 32, half: bool = True, return_probs: bool = False, tta: str = "none"):
    """(X, Y, Z) normalised image -> (X, Y, Z) labels, slice by slice along z.

    ``nearest`` (SSL4MIS): image zoomed to ``size`` with order 0, argmax, label zoomed back with order 0.
    ``bilinear`` (UniMatch/AGP): image resized bilinearly, logits upsampled bilinearly, then argmax.
    ``return_probs``: also the (C, X, Y, Z) softmax on the input grid (the argmax's own probabilities:
    zoomed back nearest, or the softmax of the upsampled logits). ``tta``: one of :data:`TTA_MODES`.
    """
    device = next(net.parameters()).device
    vol = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1).unsqueeze(1)  # (Z,1,X,Y)
    xy = tuple(vol.shape[2:])
    out = torch.empty((vol.shape[0],) + xy, dtype=torch.uint8)
    probs = None
    for s in range(0, vol.shape[0], batch):
        x = resize_image(vol[s:s + batch].to(device), size, resize)
        with _autocast(device, half):
            logits = network_logits(net, x, tta)
        if resize == "nearest":
            out[s:s + batch] = zoom_nearest(argmax(logits, 1), xy).to(torch.uint8).cpu()
            if return_probs:  # each channel zoomed as the labels are
                p = zoom_nearest(torch.softmax(logits, 1), xy)
        else:
            up = F.interpolate(logits, size=xy, mode="bilinear", align_corners=False) if xy != tuple(size) else logits
            out[s:s + batch] = argmax(up, 1).to(torch.uint8).cpu()
            if return_probs:
                p = torch.softmax(up, 1)
        if return_probs:
            if probs is None:
                probs = torch.empty((vol.shape[0], p.shape[1]) + xy, dtype=torch.float32)
            probs[s:s + batch] = p.cpu()
    labels = out.permute(1, 2, 0).numpy()
    return (labels, probs.permute(1, 2, 3, 0).numpy()) if return_probs else labels


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """``ceil((S - P) / stride) + 1`` windows, the last clamped to the border (SS-Net ``test_3d_patch``)."""
    n = math.ceil((size - patch) / stride) + 1
    return [min(stride * i, size - patch) for i in range(n)]


_IMPORTANCE: dict = {}


def importance_map(patch: tuple[int, ...], sigma_scale: float = 1 / 8) -> np.ndarray:
    """nnU-Net's Gaussian importance map: a unit impulse at the patch centre blurred with sigma =
    ``sigma_scale`` · patch side per axis, scaled to max 1; zeros (underflow) set to the smallest
    positive value so every voxel keeps some weight."""
    key = (tuple(patch), sigma_scale)
    if key not in _IMPORTANCE:
        tmp = np.zeros(patch, np.float64)
        tmp[tuple(p // 2 for p in patch)] = 1
        g = ndimage.gaussian_filter(tmp, [p * sigma_scale for p in patch], order=0, mode="constant", cval=0)
        g = g / g.max()
        if (g == 0).any():
            g[g == 0] = g[g > 0].min()
        _IMPORTANCE[key] = g.astype(np.float32)
    return _IMPORTANCE[key]


@torch.no_grad()
def predict_3d(net: torch.nn.Module, image: np.ndarray, patch: tuple[int, int, int], stride: tuple[int, int, int],
               batch: int = 4, half: bool = True, return_probs: bool = False, weighting: str = "uniform",
               tta: str = "none"):
    """Sliding window: zero-pad symmetrically up to the patch, average softmax over overlaps, argmax.

    ``weighting``: ``uniform`` (the literature, SS-Net ``test_3d_patch``: plain mean over the windows
    covering a voxel) or ``gaussian`` (nnU-Net-style importance map, sigma 1/8 of the patch; SemiSeg
    option). Windows are cut ``batch`` at a time with one gather and run in half precision on a GPU.
    ``tta``: one of :data:`TTA_MODES`, applied to each window."""
    if weighting not in ("uniform", "gaussian"):
        raise ValueError(f"unknown weighting '{weighting}' (uniform or gaussian)")
    device = next(net.parameters()).device
    img = np.asarray(image, dtype=np.float32)
    pads = [max(p - s, 0) for s, p in zip(img.shape, patch)]
    lo = [p // 2 for p in pads]
    img = np.pad(img, [(l, p - l) for l, p in zip(lo, pads)])
    vol = torch.from_numpy(img).to(device)
    starts = [window_starts(s, p, st) for s, p, st in zip(vol.shape, patch, stride)]
    corners = [(x, y, z) for x in starts[0] for y in starts[1] for z in starts[2]]
    ar = [torch.arange(p, device=device) for p in patch]
    w = torch.from_numpy(importance_map(patch)).to(device) if weighting == "gaussian" else None
    probs = None
    count = torch.zeros(vol.shape, device=device)
    for i in range(0, len(corners), batch):
        chunk = corners[i:i + batch]
        c = torch.tensor(chunk, device=device)
        xs, ys, zs = (c[:, d, None] + ar[d] for d in range(3))
        x = vol[xs[:, :, None, None], ys[:, None, :, None], zs[:, None, None, :]].unsqueeze(1)  # (b, 1, *patch)
        with _autocast(device, half):
            p = network_probs(net, x, tta)
        if w is not None:
            p = p * w
        if probs is None:
            probs = torch.zeros((p.shape[1],) + tuple(vol.shape), device=device)
        # one in-place slice add per window: deterministic (no atomics), no copy of the volume
        for (a, b, cc), pi in zip(chunk, p):
            sl = (slice(a, a + patch[0]), slice(b, b + patch[1]), slice(cc, cc + patch[2]))
            probs[(slice(None),) + sl] += pi
            count[sl] += 1 if w is None else w
    probs /= count
    crop = tuple(slice(l, l + s) for l, s in zip(lo, image.shape))
    probs = probs[(slice(None),) + crop]
    labels = argmax(probs, 0).to(torch.uint8).cpu().numpy()
    return (labels, probs.cpu().numpy()) if return_probs else labels


def largest_component(labels: np.ndarray, class_values: list[int]) -> np.ndarray:
    """Keep, per class, the largest connected component (full connectivity, as skimage.measure.label)."""
    out = np.zeros_like(labels)
    structure = np.ones((3,) * labels.ndim, dtype=bool)
    for v in class_values:
        comp, n = ndimage.label(labels == v, structure=structure)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        out[comp == sizes.argmax()] = v
    return out


def predict_volume(net: torch.nn.Module, image: np.ndarray, meta: dict, lcc: bool | None = None,
                   stride: tuple[int, ...] | None = None, half: bool = True, return_probs: bool = False,
                   tta: str | None = None):
    """Normalise as in training, predict with the checkpoint's settings, map indices to label values.
    ``return_probs``: also the (C, *image.shape) softmax (channel 0 background, then the classes in the
    checkpoint's order; 3D: averaged over the overlapping windows), before any LCC. ``tta``: the test-time
    augmentation (None = the checkpoint's, ``none`` for a model trained before it existed)."""
    img = normalize(image, meta["normalization"])
    tta = tta if tta is not None else meta.get("tta", "none")
    probs = None
    if meta["dim"] == 2:
        pred = predict_2d(net, img if img.ndim == 3 else img[..., None], tuple(meta["patch_size"]),
                          meta.get("resize", "nearest"), half=half, return_probs=return_probs, tta=tta)
        if return_probs:
            pred, probs = pred
        if image.ndim == 2:
            pred = pred[..., 0]
            probs = probs[..., 0] if probs is not None else None
    else:
        pred = predict_3d(net, img, tuple(meta["patch_size"]), tuple(stride or meta["stride"]), half=half,
                          weighting=meta.get("window_weighting", "uniform"), return_probs=return_probs, tta=tta)
        if return_probs:
            pred, probs = pred
    values = np.array([0] + [c["value"] for c in meta["classes"]], dtype=np.int32)
    pred = values[pred].astype(np.uint8 if values.max() < 256 else np.uint16)
    if lcc if lcc is not None else meta.get("lcc", False):
        pred = largest_component(pred, [c["value"] for c in meta["classes"]])
    return (pred, probs) if return_probs else pred
