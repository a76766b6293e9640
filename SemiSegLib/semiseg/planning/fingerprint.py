"""Dataset fingerprint: what a plan is decided from.

Per case: size, spacing, direction, whether the spacing is known (the benchmark ``.h5`` files store
none) and whether it is labeled. Over the labeled foreground (label > 0) of the labeled cases: the
0.5 / 99.5 percentiles, mean and standard deviation of the image intensities (from at most
``samples_per_case`` voxels per case, drawn with a fixed seed; every voxel when the case has fewer).
Modality: from the file header when it says so (MetaImage ``Modality``, DICOM tag 0008|0060, a NRRD
``modality`` key), else from the intensities: CT when the low end of the image intensities lies in the
air range of Hounsfield units (0.5th percentile of all sampled image voxels <= -500), else MR.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ..data.datasets import CaseRef, DataSplits
from ..data.io import read_volume_header

CT_AIR_THRESHOLD = -500.0  # HU: air is about -1000, fat -100; MR intensities are not negative


@dataclass
class CaseFingerprint:
    name: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    direction: tuple[float, ...]
    spacing_known: bool = True
    labeled: bool = False
    header_modality: str = ""

    @property
    def is_2d(self) -> bool:
        return len(self.shape) == 2 or self.shape[2] == 1


@dataclass
class Fingerprint:
    dataset: str
    kind: str
    cases: list[CaseFingerprint]
    foreground: dict = field(default_factory=dict)  # p00_5, p99_5, mean, std, voxels
    image_p00_5: float = 0.0   # over sampled voxels of all labeled images (air detection)
    image_min: float = 0.0
    num_classes: int = 0
    header_modality: str = ""  # CT/MR when any header says so

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cases"] = [asdict(c) for c in self.cases]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Fingerprint":
        d = dict(d)
        d["cases"] = [CaseFingerprint(**{**c, "shape": tuple(c["shape"]), "spacing": tuple(c["spacing"]),
                                         "direction": tuple(c["direction"])}) for c in d["cases"]]
        return cls(**d)

    def guess_modality(self) -> tuple[str, str]:
        """(``ct`` | ``mr``, the reason in words)."""
        if self.header_modality:
            return self.header_modality, f"file header says {self.header_modality.upper()}"
        if self.image_p00_5 <= CT_AIR_THRESHOLD:
            return "ct", (f"intensities look like Hounsfield units (0.5th percentile {self.image_p00_5:.0f} "
                          f"<= {CT_AIR_THRESHOLD:.0f}, air)")
        return "mr", (f"no Hounsfield-like air values (0.5th percentile {self.image_p00_5:.4g} > "
                      f"{CT_AIR_THRESHOLD:.0f}): treated as MR")


def header_modality(path) -> str:
    """'ct' / 'mr' when the image header names the modality, else ''."""
    try:
        import SimpleITK as sitk
        r = sitk.ImageFileReader()
        r.SetFileName(str(path))
        r.ReadImageInformation()
        text = " ".join(r.GetMetaData(k) for k in r.GetMetaDataKeys()
                        if k.lower() in ("modality", "0008|0060")).upper()
    except Exception:  # noqa: BLE001 - no header information is not an error
        return ""
    if "CT" in text:
        return "ct"
    if "MR" in text:
        return "mr"
    return ""


def _sample(values: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    values = values.ravel()
    if values.size <= n:
        return values.astype(np.float64)
    return values[rng.choice(values.size, n, replace=False)].astype(np.float64)


def fingerprint_cases(refs_labeled: list[CaseRef], refs_unlabeled: list[CaseRef], dataset: str = "", kind: str = "files",
                      num_classes: int = 0, samples_per_case: int = 10000, seed: int = 0) -> Fingerprint:
    rng = np.random.default_rng(seed)
    cases, fg, allv = [], [], []
    for ref, labeled in [(r, True) for r in refs_labeled] + [(r, False) for r in refs_unlabeled]:
        hm = header_modality(ref.sources[0]) if ref.sources else ""
        if labeled or not ref.sources:
            img = ref.image()
            shape, geometry, spacing_known = img.array.shape, img.geometry, img.spacing_known
        else:  # an unlabeled file: its grid is all the fingerprint needs
            shape, geometry = read_volume_header(ref.sources[0])
            spacing_known = True  # as read_volume's volumes
        cases.append(CaseFingerprint(ref.name, tuple(int(n) for n in shape),
                                     tuple(float(s) for s in geometry.spacing),
                                     tuple(float(v) for v in geometry.direction), bool(spacing_known), labeled, hm))
        if labeled:
            lab = ref.label().array
            fg.append(_sample(img.array[lab > 0], samples_per_case, rng))
            allv.append(_sample(img.array, samples_per_case, rng))
    fgv = np.concatenate(fg) if fg else np.zeros(0)
    allv = np.concatenate(allv) if allv else np.zeros(1)
    foreground = {}
    if fgv.size:
        foreground = {"p00_5": float(np.percentile(fgv, 0.5)), "p99_5": float(np.percentile(fgv, 99.5)),
                      "mean": float(fgv.mean()), "std": float(fgv.std()), "voxels": int(fgv.size)}
    mods = {c.header_modality for c in cases if c.header_modality}
    return Fingerprint(dataset, kind, cases, foreground, float(np.percentile(allv, 0.5)), float(allv.min()),
                       num_classes, mods.pop() if len(mods) == 1 else "")


def fingerprint_splits(splits: DataSplits, dataset: str = "", **kw) -> Fingerprint:
    """Fingerprint of the training cases (labeled + unlabeled; validation/test cases are not looked at)."""
    return fingerprint_cases(splits.labeled, splits.unlabeled, dataset or splits.kind, splits.kind,
                             len(splits.classes), **kw)
