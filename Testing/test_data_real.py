"""Readers and splits on the real benchmark files in ../shared/data (skipped when absent)."""
import shutil

import h5py
import numpy as np
import pytest

from semiseg.data.datasets import load_dataset
from semiseg.data.pipeline import BatchSource
import torch


def test_acdc_first_n_rule(acdc_root):
    d3 = load_dataset(f"acdc:{acdc_root}", labeled=3)
    d7 = load_dataset(f"acdc:{acdc_root}", labeled=7)
    assert len(d3.labeled) == 68 and len(d7.labeled) == 136
    assert len(d3.labeled) + len(d3.unlabeled) == 1312
    assert {r.name.split("_")[0] for r in d7.labeled} == {"patient099", "patient038", "patient050", "patient100",
                                                         "patient058", "patient021", "patient049"}
    assert not any(r.has_label for r in d7.unlabeled)
    assert len(d7.val) == 20 and d7.dim == 2


def test_acdc_readers_orientation(acdc_root):
    d = load_dataset(f"acdc:{acdc_root}", labeled=1)
    s = d.labeled[0]
    with h5py.File(acdc_root / "data" / "slices" / f"{s.name}.h5") as f:
        raw_img, raw_lab = f["image"][()], f["label"][()]
    img, lab = s.image(), s.label()
    assert np.array_equal(img.array, raw_img.T) and np.array_equal(lab.array, raw_lab.T)  # (H, W) -> (x, y)
    v = d.val[0]
    with h5py.File(acdc_root / "data" / f"{v.name}.h5") as f:
        raw = f["image"][()]
    vol = v.image()
    assert vol.array.shape == raw.shape[::-1] and np.array_equal(vol.array[:, :, 3], raw[3].T)
    assert set(np.unique(v.label().array)) <= {0, 1, 2, 3}
    assert not vol.spacing_known  # the h5 files carry no spacing: metrics stay in voxels


def test_la_reader_and_split(la_root):
    d = load_dataset(f"la:{la_root}", labeled=4)
    assert [r.name for r in d.labeled] == ["06SR5RBREL16DQ6M8LWS", "0RZDK210BSMWAA6467LU",
                                          "1D7CUD1955YZPGK8XHJX", "1GU15S0GJ6PFNARO469W"]
    assert len(d.unlabeled) == 36 and d.dim == 3
    img, lab = d.labeled[0].image(), d.labeled[0].label()
    assert img.array.shape == lab.array.shape and img.array.shape[2] == 88
    assert img.geometry.spacing == (0.625, 0.625, 0.625)
    assert set(np.unique(lab.array)) == {0, 1}


def test_unlabeled_labels_are_never_opened(acdc_root, tmp_path):
    """A copy of ACDC where every unlabeled slice file has *no* label dataset: training batches
    are drawn from the whole pool, and reading any unlabeled label would raise."""
    names = (acdc_root / "train_slices.list").read_text().split()
    labeled_n = 32 + 0  # patient099 = the first patient (1 labeled case)
    keep = names[:labeled_n + 40]
    (tmp_path / "data" / "slices").mkdir(parents=True)
    for i, n in enumerate(keep):
        src = acdc_root / "data" / "slices" / f"{n}.h5"
        if i < labeled_n:
            shutil.copy(src, tmp_path / "data" / "slices" / src.name)
        else:
            with h5py.File(src) as f, h5py.File(tmp_path / "data" / "slices" / src.name, "w") as g:
                g["image"] = f["image"][()]  # the label is withheld
    (tmp_path / "train_slices.list").write_text("\n".join(keep) + "\n")
    (tmp_path / "val.list").write_text("")
    d = load_dataset(f"acdc:{tmp_path}", labeled=1)
    assert len(d.labeled) == labeled_n and len(d.unlabeled) == 40
    src = BatchSource(d.labeled, d.unlabeled, 2, (64, 64), "none", 4, 4, seed=0, device=torch.device("cpu"))
    for _ in range(12):  # 48 unlabeled draws > 40: every unlabeled slice is used
        b = src.next()
        assert b.unlabeled_image.shape == (4, 1, 64, 64)
    with pytest.raises(Exception):
        d.unlabeled[0].label()
