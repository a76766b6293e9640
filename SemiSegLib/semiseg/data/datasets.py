"""Datasets named on the command line, resolved into labeled / unlabeled / val / test case lists.

A dataset is named ``acdc:PATH``, ``la:PATH``, ``phantom`` (``phantom:N`` for N training volumes),
``phantom_ct[:N]`` (the CT-like phantom, 3D), a folder of image/label files, or a CSV (columns ``image``, ``label``
(may be empty), optional ``split`` in train/val/test). Each case is a lazy reference: nothing is read until
training needs it, and an unlabeled case carries no label reader at all, so the unlabeled pool's labels are never
opened (the semi-supervised protocol of SSL4MIS ``code/dataloaders/dataset.py`` and UA-MT
``code/dataloaders/la_heart.py``). """
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import SemiSegError
from ..presets import LITERATURE_DATASETS
from .volume import ClassInfo, Geometry, Volume

ACDC_CLASSES = [ClassInfo(1, "right ventricle", (0.85, 0.35, 0.25)),
                ClassInfo(2, "myocardium", (0.95, 0.85, 0.45)),
                ClassInfo(3, "left ventricle", (0.55, 0.25, 0.85))]
LA_CLASSES = [ClassInfo(1, "left atrium", (0.85, 0.45, 0.35))]


@dataclass
class CaseRef:
    """A lazily loaded case. ``label_loader`` is None for unlabeled cases."""
    name: str
    image_loader: Callable[[], Volume]
    label_loader: Callable[[], Volume] | None = None
    sources: tuple[str, ...] = ()  # files the case is read from (keys the preprocessing cache); () = in memory
    label_key: str = ""  # what besides the files changes the loaded label (the class matching): a cache key part
    original: "CaseRef | None" = None  # a planned (preprocessed) case: the case as it came, for final scoring
    scan: str = ""  # the scan a 2D slice was cut from (ACDC's patientNNN_frameNN); "" = the case is a whole scan

    @property
    def scan_name(self) -> str:
        return self.scan or self.name

    @property
    def has_label(self) -> bool:
        return self.label_loader is not None

    def image(self) -> Volume:
        return self.image_loader()

    def label(self) -> Volume:
        if self.label_loader is None:
            raise SemiSegError(f"case '{self.name}' has no label")
        return self.label_loader()


@dataclass
class DataSplits:
    kind: str                      # acdc, la, phantom, files
    dim: int                       # 2: slice-wise training, 3: patches
    classes: list[ClassInfo]
    labeled: list[CaseRef]
    unlabeled: list[CaseRef]
    val: list[CaseRef] = field(default_factory=list)
    test: list[CaseRef] = field(default_factory=list)
    normalization: str = "none"    # applied to every image before training and inference
    description: str = ""
    plan: dict | None = None       # the preprocessing plan the cases went through (semiseg.planning), if any
    warnings: list[str] = field(default_factory=list)  # one line each, shown before training (e.g. class coverage)

    def summary(self) -> str:
        return (f"{self.kind}: {len(self.labeled)} labeled, {len(self.unlabeled)} unlabeled, "
                f"{len(self.val)} val, {len(self.test)} test ({self.dim}D, classes: "
                f"{', '.join(c.name for c in self.classes)})")


# ---------------------------------------------------------------------------------------- h5 readers
def _h5_array(path: Path, key: str) -> np.ndarray:
    import h5py
    try:
        with h5py.File(path, "r") as f:
            if key not in f:
                raise SemiSegError(f"{path}: no '{key}' dataset (found: {', '.join(f.keys())})")
            return f[key][()]
    except OSError as e:
        raise SemiSegError(f"cannot read {path}: {e}") from None


def read_acdc_h5(path: Path, key: str, name: str) -> Volume:
    """ACDC files store slices as (H, W) and volumes as (D, H, W); we use (x, y[, z]) = transposed."""
    a = _h5_array(path, key)
    a = a.T.copy()  # (H, W) -> (W, H); (D, H, W) -> (W, H, D)
    return Volume(a.astype(np.float32) if key == "image" else a.astype(np.uint8), Geometry(), name, spacing_known=False)


def read_la_h5(path: Path, key: str, name: str) -> Volume:
    """LA ``mri_norm2.h5`` is already (W, H, D) = (x, y, z); 0.625 mm isotropic (not stored in the file)."""
    a = _h5_array(path, key)
    geometry = Geometry(spacing=(0.625, 0.625, 0.625))
    return Volume(a.astype(np.float32) if key == "image" else a.astype(np.uint8), geometry, name)


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise SemiSegError(f"split list not found: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _first_patients(slice_names: list[str], n_patients: int) -> int:
    """Number of leading lines of ``train_slices.list`` that belong to its first N patients."""
    seen: list[str] = []
    for i, name in enumerate(slice_names):
        patient = name.split("_")[0]
        if patient not in seen:
            if len(seen) == n_patients:
                return i
            seen.append(patient)
    return len(slice_names)


def _acdc_volume_refs(root: Path, names: list[str]) -> list[CaseRef]:
    refs = []
    for n in names:
        p = root / "data" / f"{n}.h5"
        refs.append(CaseRef(n, partial(read_acdc_h5, p, "image", n), partial(read_acdc_h5, p, "label", n)))
    return refs


def _split_refs(split: str | None, default_root: Path, reader) -> list[CaseRef]:
    """A test/val split given as a list file (names under the dataset) or a folder of .h5 volumes."""
    if not split:
        return []
    p = Path(split)
    if p.is_dir():
        files = sorted(p.glob("*.h5")) or sorted(p.glob("*/mri_norm2.h5"))
        return [CaseRef(f.stem if f.name != "mri_norm2.h5" else f.parent.name,
                        partial(reader, f, "image", f.stem), partial(reader, f, "label", f.stem)) for f in files]
    return reader_refs_from_list(_read_list(p), default_root, reader)


def reader_refs_from_list(names: list[str], root: Path, reader) -> list[CaseRef]:
    if reader is read_acdc_h5:
        return _acdc_volume_refs(root, names)
    return [_la_ref(root, n, labeled=True) for n in names]


def load_acdc(root: Path, labeled: int, val_split: str | None, test_split: str | None) -> DataSplits:
    if not (root / "train_slices.list").is_file():
        raise SemiSegError(f"{root} is not an ACDC folder (no train_slices.list); expected the SSL4MIS layout")
    slices = _read_list(root / "train_slices.list")
    n_lab = _first_patients(slices, labeled)
    if n_lab == 0:
        raise SemiSegError("no labeled case: --labeled must be at least 1 for ACDC")

    def slice_ref(name: str, with_label: bool) -> CaseRef:
        p = root / "data" / "slices" / f"{name}.h5"
        return CaseRef(name, partial(read_acdc_h5, p, "image", name),
                       partial(read_acdc_h5, p, "label", name) if with_label else None,
                       scan=name.rsplit("_slice_", 1)[0])

    val_names = _read_list(Path(val_split)) if val_split else _read_list(root / "val.list")
    return DataSplits(
        kind="acdc", dim=2, classes=list(ACDC_CLASSES),
        labeled=[slice_ref(n, True) for n in slices[:n_lab]],
        unlabeled=[slice_ref(n, False) for n in slices[n_lab:]],
        val=_acdc_volume_refs(root, val_names),
        test=_split_refs(test_split, root, read_acdc_h5),
        normalization="none",
        description=f"ACDC {labeled} labeled patients = first {n_lab} slices of train_slices.list")


def _la_ref(root: Path, name: str, labeled: bool) -> CaseRef:
    p = root / "2018LA_Seg_Training Set" / name / "mri_norm2.h5"
    return CaseRef(name, partial(read_la_h5, p, "image", name), partial(read_la_h5, p, "label", name) if labeled else None)


def load_la(root: Path, labeled: int, val_split: str | None, test_split: str | None) -> DataSplits:
    if not (root / "train.list").is_file():
        raise SemiSegError(f"{root} is not an LA folder (no train.list); expected the UA-MT layout")
    names = _read_list(root / "train.list")
    if labeled < 1:
        raise SemiSegError("no labeled case: --labeled must be at least 1 for LA")
    if labeled > len(names):
        raise SemiSegError(f"--labeled {labeled} exceeds the {len(names)} volumes of {root / 'train.list'}")
    return DataSplits(
        kind="la", dim=3, classes=list(LA_CLASSES),
        labeled=[_la_ref(root, n, True) for n in names[:labeled]],
        unlabeled=[_la_ref(root, n, False) for n in names[labeled:]],
        val=_split_refs(val_split, root, read_la_h5), test=_split_refs(test_split, root, read_la_h5),
        normalization="none",
        description=f"LA first {labeled} of train.list labeled, {len(names) - labeled} unlabeled")


# ---------------------------------------------------------------------------------------- phantom
def _generated_splits(kind: str, dim: int, classes: list[ClassInfo], make_case, n_train: int, labeled: int,
                      n_val: int, n_test: int, seed: int, description: str) -> DataSplits:
    """Splits of a built-in generated dataset: training cases 0..n_train-1 (the first ``labeled``
    labeled), validation 1000+i, test 2000+i; each case generated once, on first use."""
    cache: dict[int, tuple[Volume, Volume]] = {}

    def case(i: int) -> tuple[Volume, Volume]:
        if i not in cache:
            cache[i] = make_case(i, seed=seed)
        return cache[i]

    def ref(i: int, with_label: bool) -> CaseRef:
        name = f"{kind}_{i:03d}"
        return CaseRef(name, lambda: _named(case(i)[0], name),
                       (lambda: _named(case(i)[1], name)) if with_label else None)

    if not 1 <= labeled <= n_train:
        raise SemiSegError(f"--labeled {labeled} must be between 1 and the {n_train} {description} training volumes")
    # per-volume z-score (for the CT phantom until a plan chooses CT clipping)
    return DataSplits(
        kind=kind, dim=dim, classes=list(classes),
        labeled=[ref(i, True) for i in range(labeled)],
        unlabeled=[ref(i, False) for i in range(labeled, n_train)],
        val=[ref(1000 + i, True) for i in range(n_val)],
        test=[ref(2000 + i, True) for i in range(n_test)],
        normalization="zscore",
        description=f"built-in {description}: {labeled} labeled + {n_train - labeled} unlabeled volumes")


def load_phantom(n_train: int, labeled: int, n_val: int = 4, n_test: int = 4, seed: int = 0) -> DataSplits:
    """The MRI-like cardiac phantom (2D training on anisotropic stacks; :mod:`semiseg.data.phantom`)."""
    from .phantom import PHANTOM_CLASSES, make_phantom_case
    return _generated_splits("phantom", 2, PHANTOM_CLASSES, make_phantom_case, n_train, labeled, n_val, n_test,
                             seed, "phantom")


def load_phantom_ct(n_train: int, labeled: int, n_val: int = 4, n_test: int = 4, seed: int = 0) -> DataSplits:
    """The CT-like phantom (3D, isotropic, Hounsfield units; :mod:`semiseg.data.phantom_ct`)."""
    from .phantom_ct import CT_PHANTOM_CLASSES, make_ct_phantom_case
    return _generated_splits("phantom_ct", 3, CT_PHANTOM_CLASSES, make_ct_phantom_case, n_train, labeled, n_val,
                             n_test, seed, "CT phantom")


def _named(v: Volume, name: str) -> Volume:
    return Volume(v.array, v.geometry, name, v.spacing_known)


# ---------------------------------------------------------------------------------------- files
IMAGE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nrrd", ".nii", ".mha", ".mhd", ".nhdr")
LABEL_MARKERS = (".seg", ".label", "_label", "_seg", "-label", "_labels")


def _stem(path: Path) -> str:
    name = path.name
    for s in IMAGE_SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return path.stem


def _file_refs(image: Path, label: Path | None, classes_holder: dict) -> CaseRef:
    from .classes import read_label
    from .io import check_same_grid, read_volume

    name = _stem(image)

    def load_label() -> Volume:
        img = read_volume(image)
        lab, classes = read_label(label, classes_holder.get("classes"),
                                  classes_holder.get("mappings", {}).get(str(label)))
        check_same_grid(img, lab, image, label)
        classes_holder.setdefault("classes", classes)
        return Volume(lab.array, lab.geometry, name, lab.spacing_known)

    label_key = ""
    if label is not None:
        import json
        label_key = json.dumps({"classes": [[c.value, c.name] for c in classes_holder.get("classes", [])],
                                "mapping": {str(k): v for k, v in
                                            classes_holder.get("mappings", {}).get(str(label), {}).items()}},
                               sort_keys=True)
    return CaseRef(name, lambda: _named(read_volume(image), name), load_label if label else None,
                   tuple(str(p) for p in (image, label) if p is not None), label_key)


def _case_key(ref: CaseRef, kind: str) -> str:
    """What makes two cases the same scan: the image file; else its name (ACDC: the patient, since the
    literature splits ACDC by patient and both frames of a patient are one case)."""
    if ref.sources:
        return ref.sources[0]
    return ref.scan_name.split("_")[0] if kind == "acdc" else ref.scan_name


def keep_held_out_apart(data: DataSplits) -> DataSplits:
    """Validation and test cases are never trained on. A labeled training case that is also a validation or
    test case is an error (its label would train the model it scores); unlabeled ones are left out of training
    with a warning (e.g. LA's train.list names every volume and a test list names some of them)."""
    held: dict[str, str] = {}
    for split in ("val", "test"):
        for ref in getattr(data, split):
            held.setdefault(_case_key(ref, data.kind), "validation" if split == "val" else "test")
    for ref in data.labeled:
        split = held.get(_case_key(ref, data.kind))
        if split:
            raise SemiSegError(f"case '{ref.scan_name}' is a labeled training case and also in the {split} split: a "
                               f"held-out case must not be trained on (take it out of the {split} list or label fewer cases)")
    kept, left = [], {}  # left: scan name -> the split that holds it
    for ref in data.unlabeled:
        split = held.get(_case_key(ref, data.kind))
        if split:
            left[ref.scan_name] = split
        else:
            kept.append(ref)
    if not left:
        return data
    names = sorted(left)
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    warning = (f"{len(names)} unlabeled case(s) left out of training: they are in the "
               f"{' and '.join(sorted(set(left.values())))} split ({shown})")
    return replace(data, unlabeled=kept, warnings=data.warnings + [warning])


def check_images(data: DataSplits) -> None:
    """Refuse, in one line naming the file, images a run cannot train on as they are: several components
    per voxel (a colour or vector image), or a 2D image among 3D volumes (or a volume among 2D images).
    Reads the image headers only; data that is not read from image files is not checked."""
    from .io import read_image_header
    flat, volumes = [], []
    for ref in data.labeled + data.unlabeled + data.val + data.test:
        if not ref.sources or ref.sources[0].lower().endswith(".h5"):
            continue
        path = ref.sources[0]
        size, _, _, components = read_image_header(path)
        if components != 1:
            raise SemiSegError(f"image {path} has {components} components per voxel (a colour or vector image); "
                               "SemiSeg trains on grey-level images: convert it to one component or leave it out")
        (flat if size[2] == 1 else volumes).append((path, size))
    if flat and volumes:
        if len(flat) <= len(volumes):
            (path, size), other = flat[0], volumes[0][0]
            raise SemiSegError(f"image {path} is a 2D image ({size[0]}x{size[1]}) but the other images are 3D "
                               f"volumes (e.g. {other}): leave it out or convert it to a volume")
        (path, size), other = volumes[0], flat[0][0]
        raise SemiSegError(f"image {path} is a 3D volume ({size[0]}x{size[1]}x{size[2]}) but the other images are "
                           f"2D (e.g. {other}): leave it out or give its slices as 2D images")


def load_case_list(cases: list[dict], classes: list[dict], base: Path, dim: int, source: str | Path) -> DataSplits:
    """Splits from an explicit case list with a fixed class table (the Slicer job's ``dataset``; no class
    inference from files). A case is ``{name, image, label?, split?}`` with paths relative to ``base``;
    ``split`` ``val`` with a label validates, a label otherwise trains, no label is unlabeled."""
    table = [ClassInfo.from_dict(c) for c in classes]
    values = [c.value for c in table]
    if not table or len(set(values)) != len(values) or min(values) < 1:
        raise SemiSegError(f"{source}: the class table needs distinct positive label values "
                           f"({', '.join(f'{c.value}: {c.name}' for c in table) or 'empty'})")
    holder = {"classes": table}
    split: dict[str, list] = {"labeled": [], "unlabeled": [], "val": []}
    for c in cases:
        image = base / c["image"]
        label = base / c["label"] if c.get("label") else None
        for p in (image, label):
            if p is not None and not p.is_file():
                raise SemiSegError(f"{source}: case '{c.get('name', image.name)}' file not found: {p}")
        kind = c.get("split", "train")
        if kind == "val" and label is not None:
            split["val"].append(_file_refs(image, label, holder))
        elif label is not None:
            split["labeled"].append(_file_refs(image, label, holder))
        else:
            split["unlabeled"].append(_file_refs(image, None, holder))
    if not split["labeled"]:
        raise SemiSegError("no labeled case for training: add at least one segmentation with its source volume "
                           "(cases kept for validation do not count)")
    return DataSplits(kind="files", dim=dim, classes=table, labeled=split["labeled"], unlabeled=split["unlabeled"],
                      val=split["val"], normalization="zscore",
                      description=f"Slicer job {base.name}: {len(split['labeled'])} labeled, "
                                  f"{len(split['unlabeled'])} unlabeled, {len(split['val'])} validation")


def load_files(spec: str, labeled: int | None, dim: int, class_map="") -> DataSplits:
    """A folder (``X.nrrd`` + ``X.seg.nrrd``/``X.label.nrrd``/``X_label.nii.gz``; unpaired images are unlabeled)
    or a CSV with columns image,label[,split]. Classes are matched across all label files (segment names,
    labelmap values) with :func:`semiseg.data.classes.match_label_classes`; ``class_map`` renames sources."""
    from .classes import class_coverage_warning, match_label_classes

    path = Path(spec)
    rows: list[tuple[Path, Path | None, str]] = []
    if path.is_file() and path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if "image" not in r:
                    raise SemiSegError(f"{path}: the CSV needs an 'image' column")
                img = (path.parent / r["image"]).resolve()
                lab = (path.parent / r["label"]).resolve() if r.get("label") else None
                rows.append((img, lab, (r.get("split") or "train").strip().lower()))
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
        labels = {}
        images = []
        for p in files:
            stem = _stem(p)
            marker = next((m for m in LABEL_MARKERS if stem.lower().endswith(m)), None)
            if marker or p.name.lower().endswith(".seg.nrrd"):
                labels[stem[: -len(marker)] if marker else stem] = p
            else:
                images.append(p)
        rows = [(p, labels.get(_stem(p)), "train") for p in images]
    else:
        raise SemiSegError(f"dataset not found: '{spec}' (expected acdc:PATH, la:PATH, phantom, a folder or a .csv)")
    for img, lab, _ in rows:
        for p in (img, lab):
            if p is not None and not p.exists():
                raise SemiSegError(f"file listed in {spec} not found: {p}")
    holder: dict = {}
    train_lab = [r for r in rows if r[1] is not None and r[2] == "train"]
    if not train_lab:
        raise SemiSegError(f"no labeled case in {spec}: pair at least one image with a label file")
    n = len(train_lab) if not labeled else labeled
    if n > len(train_lab):
        raise SemiSegError(f"--labeled {n} but only {len(train_lab)} labeled cases in {spec}")
    # one class table for every label file (the first labeled training segmentation is the reference),
    # with each file's explicit source -> class value mapping; disagreements fail here, before training
    label_files = [l for _, l, _ in train_lab] + [l for _, l, s in rows if l is not None and s != "train"]
    classes, holder["mappings"] = match_label_classes([str(l) for l in label_files], class_map)
    holder["classes"] = classes
    coverage = class_coverage_warning(classes, holder["mappings"])
    if not classes:
        raise SemiSegError(f"no class in the label files of {spec} (every label file is empty)")
    extra_val = train_lab[n:]  # labeled cases beyond --labeled validate the model instead of idling
    return DataSplits(
        kind="files", dim=dim, classes=classes,
        labeled=[_file_refs(i, l, holder) for i, l, _ in train_lab[:n]],
        unlabeled=[_file_refs(i, None, holder) for i, l, s in rows if l is None and s == "train"],
        val=[_file_refs(i, l, holder) for i, l, _ in extra_val] +
            [_file_refs(i, l, holder) for i, l, s in rows if s == "val" and l is not None],
        test=[_file_refs(i, l, holder) for i, l, s in rows if s == "test" and l is not None],
        normalization="zscore", description=f"{spec}: {n} labeled", warnings=[coverage] if coverage else [])


def load_dataset(spec: str, labeled: int | None = None, val_split: str | None = None,
                 test_split: str | None = None, dim: int | None = None, class_map="") -> DataSplits:
    """Resolve a dataset name into its splits (see the module docstring). ``class_map`` matches classes
    across the label files of a folder/CSV (:func:`semiseg.data.classes.parse_class_map`)."""
    kind, _, arg = spec.partition(":")
    if class_map and kind in LITERATURE_DATASETS + ("phantom_ct",):  # fixed class tables
        raise SemiSegError(f"class_map applies to a folder or CSV of label files, not to the built-in '{kind}' data")
    if kind == "acdc":
        return load_acdc(Path(os.path.expanduser(arg)), labeled or 7, val_split, test_split)
    if kind == "la":
        return load_la(Path(os.path.expanduser(arg)), labeled or 4, val_split, test_split)
    if kind == "phantom":
        n_train = int(arg) if arg else 20
        return load_phantom(n_train, labeled or 4)
    if kind == "phantom_ct":
        n_train = int(arg) if arg else 20
        return load_phantom_ct(n_train, labeled or 4)
    return load_files(spec, labeled, dim or 3, class_map)
