"""Damaged input files end in one line ``semiseg: error: ...`` naming the file, never a traceback.

Real files of every format the readers take (NRRD, NIfTI, MHA, Slicer ``.seg.nrrd``, LA ``.h5``) are
written, then damaged (truncated, zero-length, a bit flipped, another format's bytes under the file's name) with
seeded random positions, and read by ``semiseg plan`` (which reads the labeled cases' images and labels
in full, and every image's header). A truncated, empty or misnamed file must be an error; a flipped bit
may also give a valid file (a changed voxel value), but never anything else than one error line.
"""
import io
import random
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import h5py
import numpy as np
import pytest

from semiseg.data.io import write_labelmap, write_volume
from semiseg.data.segfile import write_segmentation
from semiseg.data.volume import ClassInfo, Geometry, Volume
from semiseg_trainer.cli import main

SHAPE = (12, 10, 6)
GEOM = Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
SEEDS = (1, 2, 3)
DAMAGE = ("truncated", "zero_length", "bit_flip", "wrong_extension")


def _case(rng: np.random.Generator):
    image = rng.normal(100, 20, SHAPE).astype(np.float32)
    label = np.zeros(SHAPE, np.uint8)
    label[3:8, 2:7, 1:5] = 1
    return image, label


def _folder(tmp: Path, image_ext: str, label_ext: str) -> tuple[Path, Path]:
    """Two labeled cases; returns the folder and the file that will be damaged (the first case's image,
    or its label for a .seg.nrrd)."""
    rng = np.random.default_rng(0)
    tmp.mkdir(parents=True)
    for i in range(2):
        image, label = _case(rng)
        write_volume(tmp / f"case{i}{image_ext}", Volume(image, GEOM))
        if label_ext == ".seg.nrrd":
            write_segmentation(tmp / f"case{i}.seg.nrrd", label, GEOM, [ClassInfo(1, "organ")])
        else:
            write_labelmap(tmp / f"case{i}_label{label_ext}", label, GEOM)
    target = tmp / ("case0.seg.nrrd" if label_ext == ".seg.nrrd" else f"case0{image_ext}")
    return tmp, target


def _la(tmp: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        d = tmp / "2018LA_Seg_Training Set" / name
        d.mkdir(parents=True)
        image, label = _case(rng)
        with h5py.File(d / "mri_norm2.h5", "w") as f:
            f["image"], f["label"] = image, label
    (tmp / "train.list").write_text("a\nb\n")
    return tmp, tmp / "2018LA_Seg_Training Set" / "a" / "mri_norm2.h5"


FORMATS = {"nrrd": (".nrrd", ".nrrd"), "nifti": (".nii.gz", ".nii.gz"), "mha": (".mha", ".mha"),
           "seg.nrrd": (".nrrd", ".seg.nrrd"), "h5": None}


def _damage(path: Path, how: str, rng: random.Random) -> Path:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:rng.randrange(1, len(data) - 1)])
    elif how == "zero_length":
        path.write_bytes(b"")
    elif how == "bit_flip":
        # text headers (NRRD, MHA, .seg.nrrd) are where a flipped bit changes the file's meaning
        end = data.find(b"\n\n") if path.name.endswith(".nrrd") else data.find(b"ElementDataFile")
        pos = rng.randrange(0, end if end > 0 else len(data))
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(flipped))
    elif how == "wrong_extension":  # another format's bytes under this name (HDF5 for images, NRRD for .h5)
        other = path.with_name("other.nrrd" if path.suffix == ".h5" else "other.h5")
        if other.suffix == ".h5":
            with h5py.File(other, "w") as f:
                f["image"] = np.zeros(SHAPE, np.float32)
        else:
            write_volume(other, Volume(np.zeros(SHAPE, np.float32), GEOM))
        path.write_bytes(other.read_bytes())
        other.unlink()
    return path


def _plan(data: str, out: Path) -> tuple[int, str, str]:
    err, std = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(std):
        rc = main(["--no-json", "plan", data, "--out", str(out / "plan.json"), "--device", "cpu", "--labeled", "1"])
    return rc, std.getvalue(), err.getvalue()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_damaged_files_end_in_one_error_line_naming_the_file(tmp_path, fmt):
    outcomes = []
    for seed in SEEDS:
        for how in DAMAGE:
            case_dir = tmp_path / f"{how}-{seed}"
            if fmt == "h5":
                root, target = _la(case_dir)
                spec = f"la:{root}"
            else:
                root, target = _folder(case_dir, *FORMATS[fmt])
                spec = str(root)
            damaged = _damage(target, how, random.Random(f"{fmt}-{how}-{seed}"))
            rc, out, err = _plan(spec, case_dir)
            assert "Traceback" not in err + out, (fmt, how, seed, err)
            lines = err.strip().splitlines()
            if rc == 0 and how == "bit_flip":  # the flip left a readable file
                outcomes.append("read")
                continue
            assert rc == 2, (fmt, how, seed, rc, err)
            assert len(lines) == 1 and lines[0].startswith("semiseg: error: "), (fmt, how, seed, err)
            assert str(damaged) in lines[0], (fmt, how, seed, lines[0])
            outcomes.append("error")
    assert outcomes.count("error") >= len(SEEDS) * (len(DAMAGE) - 1)  # every non-flip case was an error
