"""UniMatch's strong augmentation of unlabeled images, on tensors (UniMatch ``more-scenarios/medical/dataset``), batched so it runs
on the training device.

The reference (UniMatch ``more-scenarios/medical/dataset``) works per sample on PIL images:
``uint8 = (img·255)`` → ColorJitter(0.5, 0.5, 0.5, 0.25) with p = 0.8 → PIL Gaussian blur
σ ~ U(0.1, 2) with p = 0.5 → ``/255``, and draws a CutMix box with p = 0.5 (area 2–40 %, aspect
0.3–3.33). Here the same draws are made per sample on tensors:

- grey images: PIL's ``Color`` (saturation) enhancer and torchvision's ``adjust_hue`` leave an ``L``
  image unchanged, so only brightness and contrast act; their random order (ColorJitter applies the
  four in a random permutation) is kept, and so is PIL's integer arithmetic: ``trunc`` then clip to
  [0, 255] after each enhancer, contrast around ``int(mean + 0.5)``;
- blur: an exact separable Gaussian kernel (radius ⌈3σ_max⌉, edge replication) where PIL
  approximates the Gaussian with three box blurs, the result rounded to grey levels (a deviation of
  well under one grey level in the interior);
- intensities: the reference assumes images in [0, 1]. ``intensity_range="unit"`` does exactly
  that (values outside are clipped, as ``astype(uint8)`` would wrap them), ``"per_image"`` maps each
  image's min–max to [0, 1] and back (SemiSeg's own, for z-scored data), ``"auto"`` picks ``unit``
  when the whole batch lies in [0, 1] and ``per_image`` otherwise (decided on the device, no sync).

Random numbers: per-sample parameters come from ``generator`` (a CPU ``torch.Generator``) or, when it
is ``None``, from torch's global CPU RNG, whose state the training loop saves with its checkpoints
(so a resumed run draws the same augmentations). Only the small parameter vectors are drawn on the
host; every pixel operation runs on the images' device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LEVELS = 255.0
CUTMIX_CANDIDATES = 16   # (aspect, position) draws per box and round (see cutmix_box)
CUTMIX_MAX_TRIES = 1024  # draws per box at most (the reference loops until one fits)


@dataclass
class StrongAugParams:
    jitter_p: float = 0.8
    brightness: float = 0.5
    contrast: float = 0.5
    blur_p: float = 0.5
    blur_sigma_min: float = 0.1
    blur_sigma_max: float = 2.0
    intensity_range: str = "auto"   # auto, unit, per_image
    quantize: bool = True


def uniform(n: int, lo: float, hi: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` draws of U(lo, hi) on the CPU (float64, like numpy's draws)."""
    return torch.rand(n, generator=generator, dtype=torch.float64) * (hi - lo) + lo


def bernoulli(n: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` draws of ``random() < p`` (bool, CPU)."""
    return torch.rand(n, generator=generator, dtype=torch.float64) < p


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) CPU values -> (B, 1, ..., 1) on ``like``'s device and dtype, broadcastable to ``like``."""
    return v.to(device=like.device, dtype=like.dtype, non_blocking=True).view(-1, *([1] * (like.dim() - 1)))


# ------------------------------------------------------------------------------------ intensity range
def to_unit(x: torch.Tensor, mode: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Map (B, C, *S) images to [0, 1]: returns ``(u, low, scale)`` with ``x ≈ u·scale + low``."""
    x = x.float()
    dims = tuple(range(1, x.dim()))
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    unit_lo, unit_scale = torch.zeros(shape, device=x.device), torch.ones(shape, device=x.device)
    if mode == "unit":
        lo, scale = unit_lo, unit_scale
    elif mode in ("per_image", "auto"):
        lo = x.amin(dim=dims, keepdim=True)
        scale = (x.amax(dim=dims, keepdim=True) - lo).clamp_min(1e-8)
        if mode == "auto":
            in_unit = (x.min() >= 0) & (x.max() <= 1)  # 0-d tensor: decided on the device
            lo = torch.where(in_unit, unit_lo, lo)
            scale = torch.where(in_unit, unit_scale, scale)
    else:
        raise ValueError(f"unknown intensity range '{mode}' (auto, unit, per_image)")
    return ((x - lo) / scale).clamp(0, 1), lo, scale


def from_unit(u: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return u * scale + lo


def quantize_unit(x: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """The reference's ``(img·255).astype(uint8) / 255`` of the weak view, in ``x``'s own range."""
    u, lo, scale = to_unit(x, mode)
    return from_unit(torch.floor(u * LEVELS) / LEVELS, lo, scale).to(x.dtype)


# ------------------------------------------------------------------------------------ colour jitter
def _blend(base: torch.Tensor, image: torch.Tensor, factor: torch.Tensor, quantize: bool) -> torch.Tensor:
    """PIL ``Image.blend(base, image, f)`` on 8-bit grey levels: ``clip(trunc(base + f·(image − base)))``."""
    out = base + factor * (image - base)
    if quantize:
        out = torch.trunc(out)
    return out.clamp(0, LEVELS)


def adjust_brightness(v: torch.Tensor, factor: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """PIL ``ImageEnhance.Brightness``: blend with black. ``v`` in grey levels [0, 255], factor (B, 1, ...)."""
    return _blend(torch.zeros_like(v), v, factor, quantize)


def adjust_contrast(v: torch.Tensor, factor: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """PIL ``ImageEnhance.Contrast``: blend with a flat image at the mean grey level, ``int(mean + 0.5)``."""
    mean = v.mean(dim=tuple(range(1, v.dim())), keepdim=True)
    if quantize:
        mean = torch.floor(mean + 0.5)
    return _blend(mean.expand_as(v), v, factor, quantize)


def color_jitter_grey(v: torch.Tensor, p: float = 0.8, brightness: float = 0.5, contrast: float = 0.5,
                      quantize: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """torchvision ``ColorJitter(brightness, contrast, ·, ·)`` applied with probability ``p`` per image to
    grey levels ``v`` (B, C, *S) in [0, 255]; factors ~ U(max(0, 1 − a), 1 + a), brightness and contrast
    in a random order per image (saturation and hue are identities on grey images)."""
    b = v.shape[0]
    apply = bernoulli(b, p, generator)
    fb = uniform(b, max(0.0, 1 - brightness), 1 + brightness, generator)
    fc = uniform(b, max(0.0, 1 - contrast), 1 + contrast, generator)
    brightness_first = bernoulli(b, 0.5, generator)
    fb, fc = _per_sample(fb, v), _per_sample(fc, v)
    bc = adjust_contrast(adjust_brightness(v, fb, quantize), fc, quantize)
    cb = adjust_brightness(adjust_contrast(v, fc, quantize), fb, quantize)
    out = torch.where(_per_sample(brightness_first, v).bool(), bc, cb)
    return torch.where(_per_sample(apply, v).bool(), out, v)


# ------------------------------------------------------------------------------------ blur
def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, *S) with a per-image std ``sigma`` (B,) (0 = unchanged), kernel
    ``2·radius + 1`` taps, edges replicated. Grouped convolutions: one call per axis for the whole batch."""
    bsz, ch = x.shape[:2]
    nd = x.dim() - 2
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    s = sigma.to(device=x.device, dtype=torch.float32).view(-1, 1)
    w = torch.exp(-taps.view(1, -1) ** 2 / (2 * s.clamp_min(1e-6) ** 2))
    w = torch.where(s > 0, w, (taps == 0).float().view(1, -1).expand_as(w))
    w = (w / w.sum(1, keepdim=True)).repeat_interleave(ch, 0)  # (B·C, K)
    conv = F.conv2d if nd == 2 else F.conv3d
    out = x.float().reshape(1, bsz * ch, *x.shape[2:])
    for axis in range(nd):
        kshape = [bsz * ch, 1] + [1] * nd
        kshape[2 + axis] = 2 * radius + 1
        pad = [0, 0] * nd
        pad[2 * (nd - 1 - axis)] = pad[2 * (nd - 1 - axis) + 1] = radius
        out = conv(F.pad(out, pad, mode="replicate"), w.view(kshape), groups=bsz * ch)
    return out.reshape(x.shape)


def random_blur(v: torch.Tensor, p: float = 0.5, sigma_min: float = 0.1, sigma_max: float = 2.0,
                quantize: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """UniMatch ``blur``: with probability ``p`` per image, Gaussian blur with σ ~ U(sigma_min, sigma_max)
    (PIL ``GaussianBlur(radius=σ)``; σ in pixels), result rounded to grey levels."""
    b = v.shape[0]
    apply = bernoulli(b, p, generator)
    sigma = uniform(b, sigma_min, sigma_max, generator)
    sigma = torch.where(apply, sigma, torch.zeros_like(sigma))
    out = gaussian_blur(v, sigma, max(1, math.ceil(3 * sigma_max)))
    if quantize:
        out = torch.floor(out + 0.5)
    return out.clamp(0, LEVELS)


def strong_augment(x: torch.Tensor, params: StrongAugParams,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Colour jitter (p) then blur (p) of (B, 1, *S) images, returned in the input's intensity range."""
    with torch.autocast(x.device.type, enabled=False):
        u, lo, scale = to_unit(x, params.intensity_range)
        v = u * LEVELS
        if params.quantize:
            v = torch.floor(v)
        v = color_jitter_grey(v, params.jitter_p, params.brightness, params.contrast, params.quantize, generator)
        v = random_blur(v, params.blur_p, params.blur_sigma_min, params.blur_sigma_max, params.quantize, generator)
        return from_unit(v / LEVELS, lo, scale).to(x.dtype)


# ------------------------------------------------------------------------------------ CutMix box
def cutmix_box(batch: int, size: tuple[int, ...], p: float = 0.5, area_min: float = 0.02, area_max: float = 0.4,
               ratio_min: float = 0.3, ratio_max: float = 1 / 0.3, device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> torch.Tensor:
    """UniMatch ``obtain_cutmix_box`` for a batch: a (B, *size) bool mask, per image with probability
    ``p`` one box of area fraction s ~ U(area_min, area_max) and aspect r ~ U(ratio_min, ratio_max)
    (side along axis 0 ``int(X·√(s·r))``, along axis 1 ``int(Y·√(s/r))``), at a uniform position; the
    aspect and position are redrawn until the box fits, as the reference's ``while True`` loop does.
    3D (SemiSeg's own extension): sides ``int(S_i·s^(1/3)·a_i)`` with a = (√r, 1/√r, 1)."""
    nd = len(size)
    apply = bernoulli(batch, p, generator)
    frac = uniform(batch, area_min, area_max, generator) ** (1.0 / nd)
    lengths = torch.zeros(batch, nd, dtype=torch.long)
    starts = torch.zeros(batch, nd, dtype=torch.long)
    pending = apply.clone()
    dims = torch.tensor(size, dtype=torch.float64)
    # The reference redraws (aspect, position) one at a time until the box fits; the first fitting one of
    # CUTMIX_CANDIDATES independent draws has the same distribution and takes a few tensor calls, not a few
    # dozen per box (host time that a GPU step waits for).
    for _ in range(CUTMIX_MAX_TRIES // CUTMIX_CANDIDATES):
        if not bool(pending.any()):
            break
        idx = pending.nonzero().flatten()
        r = uniform(len(idx) * CUTMIX_CANDIDATES, ratio_min, ratio_max, generator).view(len(idx), CUTMIX_CANDIDATES)
        aspect = torch.ones(len(idx), CUTMIX_CANDIDATES, nd, dtype=torch.float64)
        aspect[..., 0], aspect[..., 1] = r.sqrt(), 1 / r.sqrt()
        ln = (dims * frac[idx].view(-1, 1, 1) * aspect).long()  # int(): truncation, as the reference
        st = torch.stack([torch.randint(0, n, (len(idx), CUTMIX_CANDIDATES), generator=generator) for n in size], -1)
        fits = ((st + ln) <= torch.tensor(size)).all(-1)  # (pending, candidates)
        found = fits.any(1)
        first = fits.int().argmax(1)  # the first fitting candidate (argmax returns the first maximum)
        take = torch.arange(len(idx))
        lengths[idx[found]] = ln[take, first][found]
        starts[idx[found]] = st[take, first][found]
        pending[idx[found]] = False
    mask = torch.ones((batch,) + tuple(size), dtype=torch.bool, device=device)
    lo = starts.to(device, non_blocking=True)
    hi = (starts + lengths).to(device, non_blocking=True)
    for axis, n in enumerate(size):
        ar = torch.arange(n, device=device)
        inside = (ar.view(1, -1) >= lo[:, axis:axis + 1]) & (ar.view(1, -1) < hi[:, axis:axis + 1])  # (B, n)
        shape = [batch] + [1] * nd
        shape[1 + axis] = n
        mask &= inside.view(shape)
    return mask & apply.to(device, non_blocking=True).view(-1, *([1] * nd))
