"""Inference (METHODS.md §0.7): 2D slice-wise with resize to the training size and back, 3D sliding
window with overlap averaging, optional largest-connected-component post-processing."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .data.transforms import normalize, resize_image, zoom_nearest


def _autocast(device: torch.device, half: bool):
    if half and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def predict_2d(net: torch.nn.Module, image: np.ndarray, size: tuple[int, int], resize: str = "nearest",
               batch: int = 32, half: bool = True) -> np.ndarray:
    """(X, Y, Z) normalised image -> (X, Y, Z) labels, slice by slice along z.

    ``nearest`` (SSL4MIS): image zoomed to ``size`` with order 0, argmax, label zoomed back with order 0.
    ``bilinear`` (UniMatch/AGP): image resized bilinearly, logits upsampled bilinearly, then argmax.
    """
    device = next(net.parameters()).device
    vol = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1).unsqueeze(1)  # (Z,1,X,Y)
    xy = tuple(vol.shape[2:])
    out = torch.empty((vol.shape[0],) + xy, dtype=torch.uint8)
    for s in range(0, vol.shape[0], batch):
        x = resize_image(vol[s:s + batch].to(device), size, resize)
        with _autocast(device, half):
            logits = net(x).float()
        if resize == "nearest":
            out[s:s + batch] = zoom_nearest(logits.argmax(1), xy).to(torch.uint8).cpu()
        else:
            up = F.interpolate(logits, size=xy, mode="bilinear", align_corners=False) if xy != tuple(size) else logits
            out[s:s + batch] = up.argmax(1).to(torch.uint8).cpu()
    return out.permute(1, 2, 0).numpy()


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """``ceil((S - P) / stride) + 1`` windows, the last clamped to the border (SS-Net ``test_3d_patch``)."""
    n = math.ceil((size - patch) / stride) + 1
    return [min(stride * i, size - patch) for i in range(n)]


@torch.no_grad()
def predict_3d(net: torch.nn.Module, image: np.ndarray, patch: tuple[int, int, int], stride: tuple[int, int, int],
               batch: int = 4, half: bool = True, return_probs: bool = False):
    """Sliding window: zero-pad symmetrically up to the patch, average softmax over overlaps, argmax."""
    device = next(net.parameters()).device
    img = np.asarray(image, dtype=np.float32)
    pads = [max(p - s, 0) for s, p in zip(img.shape, patch)]
    lo = [p // 2 for p in pads]
    img = np.pad(img, [(l, p - l) for l, p in zip(lo, pads)])
    vol = torch.from_numpy(img).to(device)
    starts = [window_starts(s, p, st) for s, p, st in zip(vol.shape, patch, stride)]
    corners = [(x, y, z) for x in starts[0] for y in starts[1] for z in starts[2]]
    probs = None
    count = torch.zeros(vol.shape, device=device)
    for i in range(0, len(corners), batch):
        chunk = corners[i:i + batch]
        x = torch.stack([vol[a:a + patch[0], b:b + patch[1], c:c + patch[2]] for a, b, c in chunk]).unsqueeze(1)
        with _autocast(device, half):
            p = torch.softmax(net(x).float(), 1)
        if probs is None:
            probs = torch.zeros((p.shape[1],) + tuple(vol.shape), device=device)
        for (a, b, c), pi in zip(chunk, p):
            probs[:, a:a + patch[0], b:b + patch[1], c:c + patch[2]] += pi
            count[a:a + patch[0], b:b + patch[1], c:c + patch[2]] += 1
    probs /= count
    crop = tuple(slice(l, l + s) for l, s in zip(lo, image.shape))
    probs = probs[(slice(None),) + crop]
    labels = probs.argmax(0).to(torch.uint8).cpu().numpy()
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
                   stride: tuple[int, ...] | None = None, half: bool = True) -> np.ndarray:
    """Normalise as in training, predict with the checkpoint's settings, map indices to label values."""
    img = normalize(image, meta["normalization"])
    if meta["dim"] == 2:
        pred = predict_2d(net, img if img.ndim == 3 else img[..., None], tuple(meta["patch_size"]),
                          meta.get("resize", "nearest"), half=half)
        if image.ndim == 2:
            pred = pred[..., 0]
    else:
        pred = predict_3d(net, img, tuple(meta["patch_size"]), tuple(stride or meta["stride"]), half=half)
    values = np.array([0] + [c["value"] for c in meta["classes"]], dtype=np.int32)
    pred = values[pred].astype(np.uint8 if values.max() < 256 else np.uint16)
    if lcc if lcc is not None else meta.get("lcc", False):
        pred = largest_component(pred, [c["value"] for c in meta["classes"]])
    return pred
