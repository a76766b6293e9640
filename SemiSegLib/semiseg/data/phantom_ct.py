"""A deterministic synthetic abdominal-CT-like data set (portal-venous phase look), the CT companion of
:mod:`semiseg.data.phantom` (which is MRI-like, anisotropic and axis-aligned).

Each case is generated from ``np.random.default_rng([seed, index])`` only, so a case is the same on
every machine and call. Classes (of clearly different size, so foreground-aware sampling matters):
1 liver (large), 2 kidney (both kidneys, medium), 3 liver lesion (one small hypodense sphere).

What makes it CT-like, and different from the MRI phantom:

* intensities in Hounsfield units, from :data:`CT_HU` (air -1000 outside the body, fat about -100,
  muscle/soft tissue about 40, liver 65-115 with contrast, kidney cortex 150-200 around a darker
  medulla, aorta 150-250, bone 400-1000), stored as whole numbers clipped to [-1024, 3071];
* isotropic voxels whose size varies per case (1.4-1.8 mm) and a grid size that varies per case
  (64-80 voxels in-plane, 56-72 through-plane), so resampling is exercised;
* a non-identity direction matrix (default ``diag(-1, -1, 1)``: array index i runs towards the
  patient's right, j towards anterior, as in many CT exports) and a non-zero origin. The anatomy is
  built in patient (LPS) millimetres and sampled through the voxel-to-LPS matrix, so the liver lies on
  the patient's right (LPS x < 0 relative to the body centre) and the kidneys posterior whatever the
  direction matrix is; a different ``direction`` gives the same anatomy stored in another array order;
* CT acquisition: slight partial-volume blur and additive, slightly correlated Gaussian noise.

Confounders (unlabelled): the spleen (liver-like intensity, other side), the aorta and contrast-filled
bowel loops (kidney-like intensities), air/fluid bowel, lung bases, the spine with discs, muscles.
The body is about 100-140 mm across (the anatomy is scaled down so that a case stays small enough for
CPU 3D training tests); per case the pose (shift, in-plane rotation), body size and organ sizes vary.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .volume import ClassInfo, Geometry, Volume

__all__ = ["CT_PHANTOM_CLASSES", "CT_HU", "DEFAULT_CT_DIRECTION", "make_ct_phantom_case",
           "make_ct_phantom_dataset", "write_ct_phantom_dataset"]

CT_PHANTOM_CLASSES = [
    ClassInfo(1, "liver", (0.87, 0.51, 0.40)),
    ClassInfo(2, "kidney", (0.73, 0.40, 0.33)),
    ClassInfo(3, "liver lesion", (0.95, 0.85, 0.30)),
]
LIVER, KIDNEY, LESION = 1, 2, 3

# Hounsfield ranges: the per-case mean level of each tissue is drawn uniformly from its range
# (texture and noise then spread the voxels around that level).
CT_HU: dict[str, tuple[float, float]] = {
    "air": (-1000.0, -1000.0),
    "lung": (-880.0, -800.0),
    "fat": (-120.0, -80.0),
    "soft_tissue": (30.0, 55.0),
    "muscle": (40.0, 60.0),
    "liver": (65.0, 115.0),
    "spleen_offset": (-15.0, 5.0),      # spleen = liver level + offset (a liver-like confounder)
    "lesion_contrast": (-60.0, -40.0),  # lesion = liver level + contrast (hypodense)
    "kidney_cortex": (150.0, 200.0),
    "kidney_medulla": (95.0, 135.0),
    "aorta": (150.0, 250.0),
    "ivc": (90.0, 140.0),
    "bone_cancellous": (400.0, 550.0),
    "bone_cortical": (700.0, 1000.0),
    "disc": (70.0, 100.0),
    "csf": (0.0, 15.0),
    "bowel_wall": (30.0, 50.0),
    "bowel_fluid": (0.0, 20.0),
    "bowel_contrast": (200.0, 350.0),
}
NOISE_HU = (8.0, 16.0)  # standard deviation of the additive noise, per case

# LPS direction: array index i -> patient right (-x), j -> anterior (-y), k -> superior (+z)
DEFAULT_CT_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def _u(rng, key: str) -> float:
    lo, hi = CT_HU[key]
    return float(rng.uniform(lo, hi)) if hi > lo else float(lo)


def make_ct_phantom_case(index: int, seed: int = 0, shape: tuple[int, int, int] | None = None,
                         spacing: float | None = None, direction=None) -> tuple[Volume, Volume]:
    """One synthetic abdominal CT case: (image float32 in HU, label uint8), arrays in (x, y, z).

    ``shape`` (default: random 64-80 x 64-80 x 56-72), ``spacing`` (isotropic mm, default: random
    1.4-1.8) and ``direction`` (row-major 3x3, default :data:`DEFAULT_CT_DIRECTION`) override the
    per-case draws; every other draw is the same whatever they are.
    """
    rng = np.random.default_rng([int(seed), int(index)])
    # the grid: always draw, so an override does not shift the anatomy's random stream
    drawn_shape = (int(rng.integers(64, 81)), int(rng.integers(64, 81)), int(rng.integers(56, 73)))
    drawn_spacing = round(float(rng.uniform(1.4, 1.8)), 3)
    n = np.asarray(shape if shape is not None else drawn_shape, dtype=int)
    s = float(spacing if spacing is not None else drawn_spacing)
    d = np.asarray(direction if direction is not None else DEFAULT_CT_DIRECTION, dtype=float).reshape(3, 3)
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-6):
        raise ValueError("direction must be an orthonormal 3x3 matrix")

    # centre of the grid in LPS (table position, somewhere in the abdomen) and the origin from it
    centre = np.array([rng.uniform(-15.0, 15.0), rng.uniform(-40.0, 10.0), rng.uniform(-350.0, -150.0)])
    origin = centre - d @ (s * (n - 1) / 2.0)
    origin = np.round(origin, 3)
    centre = origin + d @ (s * (n - 1) / 2.0)

    # LPS millimetres of every voxel, relative to the grid centre
    idx = [np.arange(k, dtype=float) * s for k in n]
    grids = [idx[0][:, None, None], idx[1][None, :, None], idx[2][None, None, :]]
    rel = [origin[r] - centre[r] + sum(d[r, a] * grids[a] for a in range(3)) for r in range(3)]
    rel = [np.broadcast_to(c, tuple(n)) for c in rel]
    fov = np.abs(d) @ (s * n)  # field of view along the patient axes x (L), y (P), z (S)

    # ---- pose: shift, in-plane rotation; normalised body coordinates u (left), v (posterior), w (superior)
    shift = np.array([rng.uniform(-0.05, 0.05) * fov[0], rng.uniform(-0.05, 0.05) * fov[1], 0.0])
    angle = rng.uniform(-0.2, 0.2)
    half_a = fov[0] * rng.uniform(0.43, 0.48)          # body half-width (mm)
    half_b = min(half_a * rng.uniform(0.72, 0.85), fov[1] * 0.46)  # body half-depth (mm)
    half_h = fov[2] / 2.0
    qx, qy, qz = rel[0] - shift[0], rel[1] - shift[1], rel[2] - shift[2]
    c, sn = np.cos(angle), np.sin(angle)
    u = ((c * qx + sn * qy) / half_a).astype(np.float32)
    v = ((-sn * qx + c * qy) / half_b).astype(np.float32)
    w = (qz / half_h).astype(np.float32)

    def ellipsoid(cu, cv, cw, au, av, aw, rot=0.0):
        du, dv = u - cu, v - cv
        if rot:
            cr, sr = np.cos(rot), np.sin(rot)
            du, dv = cr * du + sr * dv, -sr * du + cr * dv
        return np.sqrt((du / au) ** 2 + (dv / av) ** 2 + ((w - cw) / aw) ** 2)

    def disc(cu, cv, radius_mm):
        """Infinite cylinder along z with a radius in millimetres (vessels, spine)."""
        return np.sqrt(((u - cu) * half_a) ** 2 + ((v - cv) * half_b) ** 2) < radius_mm

    def texture(sigma_vox: float) -> np.ndarray:
        t = ndimage.gaussian_filter(rng.standard_normal(tuple(n)), sigma_vox)
        return t / max(float(t.std()), 1e-6)

    # ---- body, fat, muscles, background texture
    wob = 1.0 + 0.03 * np.cos(3 * np.arctan2(v, u) + rng.uniform(0, 2 * np.pi))
    body_r = np.sqrt(u ** 2 + v ** 2) / wob
    body = body_r < 1.0
    fat_t = rng.uniform(0.08, 0.14)
    inner = body_r < 1.0 - fat_t
    img = np.full(tuple(n), CT_HU["air"][0])
    fat_level, soft_level, muscle_level = _u(rng, "fat"), _u(rng, "soft_tissue"), _u(rng, "muscle")
    tex = texture(2.0)
    img[body] = (fat_level + 8.0 * tex)[body]
    # abdominal wall muscle ring just inside the subcutaneous fat
    wall = inner & (body_r > 1.0 - fat_t - rng.uniform(0.04, 0.07))
    # intra-abdominal fat / soft tissue mix from a smooth random field
    mix = texture(3.0)
    visceral = inner & ~wall
    img[visceral] = np.where(mix > rng.uniform(0.2, 0.6), fat_level + 10.0 * tex, soft_level + 8.0 * tex)[visceral]
    img[wall] = (muscle_level + 6.0 * tex)[wall]
    for side in (-1.0, 1.0):  # paraspinal muscles
        para = (ellipsoid(side * 0.27, 0.74, 0.0, 0.17, 0.15, 1e6) < 1.0) & inner
        img[para] = (muscle_level + 6.0 * tex)[para]

    # bowel loops (anterior): walls with air, fluid or positive oral contrast inside
    for _ in range(int(rng.integers(3, 7))):
        cu, cv, cw = rng.uniform(-0.45, 0.45), rng.uniform(-0.7, -0.1), rng.uniform(-1.0, 0.4)
        au, av, aw = rng.uniform(0.08, 0.16), rng.uniform(0.08, 0.16), rng.uniform(0.15, 0.5)
        r = ellipsoid(cu, cv, cw, au, av, aw, rng.uniform(0, np.pi))
        loop_wall, lumen = (r < 1.0) & inner, (r < 0.7) & inner
        content = rng.choice(["air", "bowel_fluid", "bowel_contrast"], p=[0.35, 0.35, 0.3])
        img[loop_wall] = _u(rng, "bowel_wall")
        img[lumen] = _u(rng, str(content)) if content != "air" else rng.uniform(-1000.0, -850.0)

    # lung bases in the top slices, posterior-lateral
    lung_w = rng.uniform(0.55, 0.8)
    lung_level = _u(rng, "lung")
    for side in (-1.0, 1.0):
        lung = (ellipsoid(side * 0.45, 0.2, 1.25, 0.38, 0.55, 1.25 - lung_w) < 1.0) & inner & (w > lung_w)
        img[lung] = lung_level + 15.0 * tex[lung]

    # spine: vertebral body (cancellous core, cortical rim, discs), canal, posterior arch
    vb_r = rng.uniform(0.15, 0.19) * half_a
    vb_v = rng.uniform(0.5, 0.6)
    vb = disc(0.0, vb_v, vb_r) & inner
    vb_core = disc(0.0, vb_v, vb_r - 1.6 * s) & inner
    canal_v = vb_v + (vb_r + 0.08 * half_a) / half_b
    canal = disc(0.0, canal_v, 0.07 * half_a) & inner
    arch = disc(0.0, canal_v, 0.12 * half_a) & inner & ~canal
    cortical, cancellous = _u(rng, "bone_cortical"), _u(rng, "bone_cancellous")
    img[vb | arch] = cortical
    img[vb_core] = cancellous + 25.0 * tex[vb_core]
    period_mm = rng.uniform(22.0, 30.0)
    discs = vb & (np.cos(2 * np.pi * qz / period_mm + rng.uniform(0, 2 * np.pi)) > 0.8)
    img[discs] = _u(rng, "disc")
    img[canal] = _u(rng, "csf")
    spine = vb | arch | canal

    # great vessels in front of the spine
    aorta = disc(rng.uniform(0.08, 0.16), vb_v - rng.uniform(0.3, 0.38), rng.uniform(0.08, 0.1) * half_a) & inner
    ivc = disc(-rng.uniform(0.14, 0.2), vb_v - rng.uniform(0.25, 0.35), rng.uniform(0.07, 0.09) * half_a) & inner
    img[aorta] = _u(rng, "aorta")
    img[ivc] = _u(rng, "ivc")

    # spleen (unlabelled, liver-like), left posterior, upper abdomen
    liver_level = _u(rng, "liver")
    spleen = (ellipsoid(rng.uniform(0.45, 0.55), rng.uniform(0.15, 0.3), rng.uniform(0.3, 0.6),
                        rng.uniform(0.15, 0.2), rng.uniform(0.25, 0.32), rng.uniform(0.35, 0.5),
                        rng.uniform(-0.4, 0.4)) < 1.0) & inner & ~spine
    spleen_level = liver_level + _u(rng, "spleen_offset")
    img[spleen] = (spleen_level + 5.0 * tex)[spleen]

    # ---- labelled organs
    liver = (ellipsoid(-rng.uniform(0.38, 0.46), rng.uniform(-0.15, 0.0), rng.uniform(0.25, 0.45),
                       rng.uniform(0.42, 0.5), rng.uniform(0.55, 0.68), rng.uniform(0.75, 0.95),
                       rng.uniform(-0.3, 0.3)) < 1.0) & inner & ~spine & ~aorta & ~ivc
    kidneys = np.zeros(tuple(n), dtype=bool)
    medulla = np.zeros(tuple(n), dtype=bool)
    for side in (-1.0, 1.0):
        kr = ellipsoid(side * rng.uniform(0.34, 0.42), vb_v - rng.uniform(0.0, 0.12),
                       rng.uniform(-0.45, -0.2) + (0.1 if side > 0 else 0.0),  # left kidney a bit higher
                       rng.uniform(0.14, 0.18), rng.uniform(0.2, 0.26), rng.uniform(0.38, 0.5),
                       side * rng.uniform(0.3, 0.7))
        k = (kr < 1.0) & inner & ~spine & ~aorta & ~ivc
        kidneys |= k
        medulla |= k & (kr < rng.uniform(0.55, 0.68))
    liver &= ~kidneys
    img[liver] = (liver_level + 5.0 * tex)[liver]
    img[kidneys] = _u(rng, "kidney_cortex") + 4.0 * tex[kidneys]
    img[medulla] = _u(rng, "kidney_medulla") + 4.0 * tex[medulla]

    # one small hypodense lesion well inside the liver
    radius_mm = rng.uniform(3.5, 6.0)
    if not liver.any():
        raise ValueError(f"CT phantom case {index}: the grid {tuple(n)} at {s} mm holds no liver")
    box = ndimage.find_objects(liver.astype(np.uint8))[0]
    depth = np.zeros(tuple(n))
    depth[box] = ndimage.distance_transform_edt(np.pad(liver[box], 1))[1:-1, 1:-1, 1:-1] * s
    candidates = np.argwhere(depth > radius_mm + 1.5 * s)
    if not len(candidates):  # a very thin liver: take its deepest voxel
        candidates = np.argwhere(depth == depth.max())
    # the candidate nearest to a random point of the liver's bounding box, in LPS millimetres (not an
    # index into the candidate list), so the lesion does not depend on the array order (direction)
    cand_mm = np.stack([rel[a][tuple(candidates.T)] for a in range(3)], axis=1)
    target = cand_mm.min(axis=0) + rng.uniform(0.0, 1.0, size=3) * np.ptp(cand_mm, axis=0)
    centre_mm = cand_mm[int(np.argmin(((cand_mm - target) ** 2).sum(axis=1)))]
    lesion = ((rel[0] - centre_mm[0]) ** 2 + (rel[1] - centre_mm[1]) ** 2
              + (rel[2] - centre_mm[2]) ** 2 < radius_mm ** 2) & liver
    img[lesion] = liver_level + _u(rng, "lesion_contrast") + 3.0 * tex[lesion]

    label = np.zeros(tuple(n), dtype=np.uint8)
    label[liver] = LIVER
    label[kidneys] = KIDNEY
    label[lesion] = LESION

    # ---- acquisition: partial volume, correlated noise, integer HU
    img = ndimage.gaussian_filter(img, sigma=0.6)
    noise = ndimage.gaussian_filter(rng.standard_normal(tuple(n)), 0.5)
    noise *= rng.uniform(*NOISE_HU) / max(float(noise.std()), 1e-6)
    img = np.clip(np.round(img + noise), -1024.0, 3071.0)

    geometry = Geometry((s, s, s), tuple(float(o) for o in origin), tuple(float(x) for x in d.ravel()))
    name = f"ct_{int(index):03d}"
    return (Volume(img.astype(np.float32), geometry, name),
            Volume(label, Geometry(geometry.spacing, geometry.origin, geometry.direction), name))


def make_ct_phantom_dataset(n_cases: int, **kw) -> list[tuple[Volume, Volume]]:
    """Cases 0..n_cases-1 (keyword arguments go to :func:`make_ct_phantom_case`)."""
    return [make_ct_phantom_case(i, **kw) for i in range(int(n_cases))]


def write_ct_phantom_dataset(folder, n_cases: int, seed: int = 0, **kw) -> list[tuple[str, str]]:
    """Write ``ct_XXX.nrrd`` images and ``ct_XXX.seg.nrrd`` Slicer segmentations into ``folder``.

    Returns the (image path, label path) pairs.
    """
    from .phantom import write_generated_cases
    return write_generated_cases(folder, n_cases, make_ct_phantom_case, CT_PHANTOM_CLASSES, "ct", seed, **kw)
