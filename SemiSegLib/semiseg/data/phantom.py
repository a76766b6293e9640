"""A deterministic synthetic cardiac-MRI-like data set (short-axis cine, end-diastole look).

Each case is generated from ``np.random.default_rng([seed, index])`` only, so a case is the same on
every machine and call, and a data set of any size costs no download. Labels follow ACDC:
1 right ventricle, 2 myocardium, 3 left ventricle.

Anatomy (in-plane millimetres, base at z index 0, apex at the last slice):

* the left-ventricle blood pool, an ellipse whose radius shrinks towards the apex (it vanishes in the
  last slice or two), with a couple of dark papillary muscles inside (labelled LV, as in ACDC);
* the myocardium, a ring of random thickness (thicker lateral wall) around it, dark grey;
* the right ventricle, a bright crescent wrapped partly around the septum, with a thin dark free
  wall (not labelled), ending before the apex;
* background: the body with a smooth tissue texture, lungs, a subcutaneous fat layer, the
  descending aorta (bright, unlabelled), liver in the apical slices and random darker/brighter
  blobs. Tissue and myocardium intensities overlap, so thresholding cannot find the myocardium.

MRI-like acquisition: in-plane partial-volume blur, a smooth multiplicative bias field and Rician
noise. Random pose per case: centre shift, in-plane rotation, scale and a tilt of the long axis.
"""
from __future__ import annotations

import os

import numpy as np
from scipy import ndimage

from .volume import ClassInfo, Geometry, Volume

__all__ = ["PHANTOM_CLASSES", "make_phantom_case", "make_phantom_dataset", "write_phantom_dataset"]

PHANTOM_CLASSES = [
    ClassInfo(1, "right ventricle", (0.90, 0.55, 0.20)),
    ClassInfo(2, "myocardium", (0.30, 0.70, 0.35)),
    ClassInfo(3, "left ventricle", (0.85, 0.20, 0.25)),
]

RV, MYO, LV = 1, 2, 3


def _ellipse(u: np.ndarray, v: np.ndarray, a, b) -> np.ndarray:
    """Normalised elliptic radius (< 1 inside) for semi-axes a (along u) and b (along v)."""
    a = np.maximum(a, 1e-6)
    b = np.maximum(b, 1e-6)
    return np.sqrt((u / a) ** 2 + (v / b) ** 2)


def _rotate(x: np.ndarray, y: np.ndarray, cx, cy, angle) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = x - cx, y - cy
    return c * dx + s * dy, -s * dx + c * dy


def make_phantom_case(index: int, shape=(96, 96, 12), spacing=(1.5, 1.5, 8.0), seed: int = 0
                      ) -> tuple[Volume, Volume]:
    """One synthetic short-axis case: (image float32, label uint8), arrays in (x, y, z)."""
    rng = np.random.default_rng([int(seed), int(index)])
    nx, ny, nz = (int(n) for n in shape)
    sx, sy, sz = (float(s) for s in spacing)

    # in-plane millimetre grid centred on the field of view; per-slice parameters broadcast on z
    x = ((np.arange(nx) - (nx - 1) / 2.0) * sx)[:, None, None]
    y = ((np.arange(ny) - (ny - 1) / 2.0) * sy)[None, :, None]
    t = (np.arange(nz) / max(nz - 1, 1))[None, None, :]  # 0 at the base, 1 at the apex
    fov = min(nx * sx, ny * sy)

    # ---- pose and shape of the heart
    scale = rng.uniform(0.85, 1.15) * fov / 144.0
    angle = np.pi + rng.uniform(-0.5, 0.5)  # direction of the RV from the LV centre
    cx0, cy0 = rng.uniform(-0.07, 0.07, size=2) * fov
    tilt = rng.uniform(-0.05, 0.05, size=2) * fov  # long axis not quite along z
    cx, cy = cx0 + tilt[0] * t, cy0 + tilt[1] * t
    r_epi0 = rng.uniform(24.0, 30.0) * scale
    thick0 = rng.uniform(5.5, 9.0) * scale
    ecc = rng.uniform(0.85, 1.0)
    apex_t = rng.uniform(0.98, 1.12)  # where the epicardium closes
    wobble_amp, wobble_phase = rng.uniform(0.0, 0.06), rng.uniform(0, 2 * np.pi)

    profile = np.sqrt(np.clip(1.0 - (t / apex_t) ** 2, 0.0, None))
    r_epi = r_epi0 * profile
    thick = thick0 * (1.0 - 0.25 * t)

    u, v = _rotate(x, y, cx, cy, angle)  # u points to the RV
    phi = np.arctan2(v, u)
    rho = _ellipse(u, v, 1.0, ecc) / (1.0 + wobble_amp * np.cos(3 * phi + wobble_phase))
    # thicker lateral wall (opposite the RV), thinner septum
    local_thick = thick * (1.0 - 0.2 * np.cos(phi))
    heart = rho < r_epi
    lv = rho < (r_epi - local_thick)
    myo = heart & ~lv

    # papillary muscles: small dark discs inside the LV cavity (labelled LV, as in ACDC)
    papillary = np.zeros_like(lv)
    for _ in range(2):
        pa = np.pi + rng.uniform(-1.0, 1.0)
        pr = rng.uniform(2.0, 3.2) * scale
        pd = (r_epi - local_thick - pr * 1.2).clip(0.0, None)
        pu, pv = pd * np.cos(pa), pd * np.sin(pa)
        papillary |= ((u - pu) ** 2 + (v - pv) ** 2 < pr ** 2) & (r_epi - thick > 3 * pr)
    papillary &= lv

    # right ventricle: an ellipse beside the LV, outside the epicardium, ending before the apex
    rv_end = rng.uniform(0.6, 0.85)
    rv_profile = np.sqrt(np.clip(1.0 - (t / rv_end) ** 2, 0.0, None))
    rv_dist = r_epi0 * rng.uniform(0.55, 0.75) * np.maximum(profile, 0.3)
    rv_a = r_epi0 * rng.uniform(0.95, 1.2) * rv_profile
    rv_b = r_epi0 * rng.uniform(1.2, 1.5) * rv_profile
    rv_wall = rng.uniform(2.0, 3.5) * scale
    rv_rho = _ellipse(u - rv_dist, v, rv_a, rv_b)
    rv_outer = _ellipse(u - rv_dist, v, rv_a + rv_wall, rv_b + rv_wall) < 1.0
    rv = (rv_rho < 1.0) & ~heart & (rho > r_epi + 0.5)
    rv_free_wall = rv_outer & ~rv & ~heart & (rv_a > 0)

    label = np.zeros((nx, ny, nz), dtype=np.uint8)
    label[rv] = RV
    label[myo] = MYO
    label[lv] = LV

    # ---- background anatomy (intensities in an MRI-like 0..1000 range)
    tissue = rng.uniform(230.0, 330.0)
    myo_level = tissue * rng.uniform(0.8, 0.95)  # within the spread of the surrounding tissue
    blood = rng.uniform(650.0, 820.0)
    img = np.full((nx, ny, nz), 15.0)

    bcx, bcy = rng.uniform(-0.04, 0.04, size=2) * fov
    body_a, body_b = fov * rng.uniform(0.44, 0.49), fov * rng.uniform(0.34, 0.40)
    body_r = np.broadcast_to(_ellipse(x - bcx, y - bcy, body_a, body_b), (nx, ny, nz))
    body = body_r < 1.0
    texture = ndimage.gaussian_filter(rng.standard_normal((nx, ny, nz)), sigma=(4.0, 4.0, 0.7))
    texture /= max(float(texture.std()), 1e-6)
    img[body] = (tissue + 45.0 * texture)[body]
    fat_layer = body & (body_r > 1.0 - rng.uniform(0.06, 0.1))
    img[fat_layer] = rng.uniform(520.0, 680.0)

    # lungs either side of the heart (dark)
    for side in (-1.0, 1.0):
        lx = side * fov * rng.uniform(0.22, 0.28) + bcx
        ly = bcy + rng.uniform(-0.08, 0.04) * fov
        lung = _ellipse(*_rotate(x, y, lx, ly, rng.uniform(-0.4, 0.4)),
                        fov * rng.uniform(0.13, 0.18), fov * rng.uniform(0.17, 0.24)) < 1.0
        lung = lung & body & ~fat_layer
        img[lung] = rng.uniform(35.0, 80.0)

    # liver in the apical slices: a large region with a myocardium-like intensity
    liver_start = rng.uniform(0.45, 0.7)
    liver_side = rng.choice([-1.0, 1.0])
    liver = (_ellipse(x - liver_side * fov * 0.22 - bcx, y - bcy - fov * 0.1, fov * 0.3, fov * 0.22) < 1.0) \
        & body & ~fat_layer & (t >= liver_start)
    img[liver] = (myo_level * rng.uniform(0.95, 1.2) + 25.0 * texture)[liver]

    # random blobs: darker and brighter structures (vessels, fat, bowel, ...)
    for _ in range(int(rng.integers(4, 9))):
        bx, by = rng.uniform(-0.35, 0.35, size=2) * fov
        ba, bb = rng.uniform(3.0, 12.0, size=2) * scale
        z0, z1 = sorted(rng.uniform(-0.2, 1.2, size=2))
        blob = (_ellipse(*_rotate(x, y, bx, by, rng.uniform(0, np.pi)), ba, bb) < 1.0) \
            & (t >= z0) & (t <= z1) & body
        img[blob] = rng.choice([rng.uniform(60.0, 180.0), rng.uniform(450.0, 750.0)])

    # descending aorta: bright like blood, behind the heart, through all slices (not labelled)
    aorta_r = rng.uniform(7.0, 10.0) * scale
    ad = r_epi0 + rng.uniform(8.0, 16.0) * scale
    aa = angle + np.pi * rng.uniform(0.55, 0.8) * rng.choice([-1.0, 1.0])
    aorta = ((x - cx0 - ad * np.cos(aa)) ** 2 + (y - cy0 - ad * np.sin(aa)) ** 2 < aorta_r ** 2) & body
    img[aorta] = blood * rng.uniform(0.9, 1.05)

    # epicardial fat on part of the heart's surface (bright ring segment, unlabelled)
    fat_angle, fat_width = rng.uniform(0, 2 * np.pi), rng.uniform(0.8, 2.0)
    fat_ring = (rho >= r_epi) & (rho < r_epi + rng.uniform(2.0, 4.0) * scale) & \
        (np.cos(phi - fat_angle) > np.cos(fat_width)) & (r_epi > 0)
    img[fat_ring] = rng.uniform(480.0, 650.0)

    # ---- the heart itself
    img[rv_free_wall] = myo_level * rng.uniform(0.9, 1.1)
    img[rv] = blood * rng.uniform(0.85, 1.0)
    img[myo] = (myo_level + 20.0 * texture)[myo]
    img[lv] = blood
    img[papillary] = myo_level * rng.uniform(0.9, 1.15)

    # ---- acquisition: partial volume, bias field, Rician noise
    img = ndimage.gaussian_filter(img, sigma=(0.7, 0.7, 0.0))
    xn, yn = x / (fov / 2), y / (fov / 2)
    coeffs = rng.normal(0.0, 0.12, size=6)
    log_bias = (coeffs[0] * xn + coeffs[1] * yn + coeffs[2] * xn * yn + coeffs[3] * xn ** 2
                + coeffs[4] * yn ** 2 + coeffs[5] * (t - 0.5))
    img *= np.exp(np.clip(log_bias, -0.4, 0.4))
    sigma = rng.uniform(15.0, 35.0)
    noise = rng.standard_normal((2, nx, ny, nz)) * sigma
    img = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)

    origin = (round(-(nx - 1) / 2 * sx + rng.uniform(-20, 20), 3),
              round(-(ny - 1) / 2 * sy + rng.uniform(-20, 20), 3),
              round(-rng.uniform(20, 80), 3))
    geometry = Geometry((sx, sy, sz), origin, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    name = f"case_{int(index):03d}"
    return (Volume(img.astype(np.float32), geometry, name),
            Volume(label, Geometry(geometry.spacing, geometry.origin, geometry.direction), name))


def make_phantom_dataset(n_cases: int, **kw) -> list[tuple[Volume, Volume]]:
    """Cases 0..n_cases-1 (keyword arguments go to :func:`make_phantom_case`)."""
    return [make_phantom_case(i, **kw) for i in range(int(n_cases))]


def write_phantom_dataset(folder, n_cases: int, seed: int = 0, **kw) -> list[tuple[str, str]]:
    """Write ``case_XXX.nrrd`` images and ``case_XXX.seg.nrrd`` Slicer segmentations into ``folder``.

    Returns the (image path, label path) pairs.
    """
    return write_generated_cases(folder, n_cases, make_phantom_case, PHANTOM_CLASSES, "case", seed, **kw)


def write_generated_cases(folder, n_cases: int, make_case, classes, prefix: str, seed: int = 0,
                          **kw) -> list[tuple[str, str]]:
    """Cases 0..n_cases-1 of a generator as ``PREFIX_XXX.nrrd`` + ``PREFIX_XXX.seg.nrrd`` (both phantoms)."""
    from .io import write_volume
    from .segfile import write_segmentation

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    pairs = []
    for i in range(int(n_cases)):
        image, label = make_case(i, seed=seed, **kw)
        image_path = os.path.join(folder, f"{prefix}_{i:03d}.nrrd")
        label_path = os.path.join(folder, f"{prefix}_{i:03d}.seg.nrrd")
        write_volume(image_path, image)
        write_segmentation(label_path, label.array, label.geometry, classes)
        pairs.append((image_path, label_path))
    return pairs
