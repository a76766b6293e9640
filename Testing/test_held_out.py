"""Validation and test cases are never trained on: an unlabeled training case that a validation or test split
names is left out of training with a warning naming it; a labeled one is a one-line error. Real h5 and NRRD files,
the LA folder layout and a CSV dataset, through prepare_run (the path every entry point takes)."""
import h5py
import numpy as np
import pytest

from semiseg.data.io import write_labelmap, write_volume
from semiseg.data.volume import Geometry, Volume
from semiseg.errors import SemiSegError
from semiseg.run import prepare_run

LA_NAMES = [f"CASE{i}" for i in range(6)]


def la_folder(root):
    """An LA-layout folder: train.list and ``2018LA_Seg_Training Set/<name>/mri_norm2.h5`` (32^3, one blob)."""
    rng = np.random.default_rng(0)
    for name in LA_NAMES:
        d = root / "2018LA_Seg_Training Set" / name
        d.mkdir(parents=True)
        label = np.zeros((32, 32, 32), np.uint8)
        label[8:24, 8:24, 8:24] = 1
        with h5py.File(d / "mri_norm2.h5", "w") as f:
            f["image"] = (label + rng.normal(0, 0.3, label.shape)).astype(np.float32)
            f["label"] = label
    (root / "train.list").write_text("\n".join(LA_NAMES) + "\n")
    return root


def prepare(data, tmp_path, **extra):
    warnings = []
    explicit = {"data": data, "method": "mean_teacher", "iterations": 2, "device": "cpu", "plan": "off", **extra}
    _, splits, _ = prepare_run(explicit, None, tmp_path / "run", on_warning=warnings.append)
    return splits, warnings


def test_la_test_list_naming_training_volumes_keeps_them_out_of_training(tmp_path):
    root = la_folder(tmp_path / "LA")
    (tmp_path / "test.list").write_text("CASE4\nCASE5\n")
    (tmp_path / "val.list").write_text("CASE3\n")
    splits, warnings = prepare(f"la:{root}", tmp_path, labeled=2, test_split=str(tmp_path / "test.list"),
                               val_split=str(tmp_path / "val.list"))
    assert [r.name for r in splits.labeled] == ["CASE0", "CASE1"]
    assert [r.name for r in splits.unlabeled] == ["CASE2"]
    assert [r.name for r in splits.test] == ["CASE4", "CASE5"] and [r.name for r in splits.val] == ["CASE3"]
    assert warnings == ["3 unlabeled case(s) left out of training: they are in the test and validation split "
                        "(CASE3, CASE4, CASE5)"]


def test_la_test_list_naming_a_labeled_volume_is_one_error_line(tmp_path):
    root = la_folder(tmp_path / "LA")
    (tmp_path / "test.list").write_text("CASE1\nCASE5\n")
    with pytest.raises(SemiSegError) as e:
        prepare(f"la:{root}", tmp_path, labeled=2, test_split=str(tmp_path / "test.list"))
    assert str(e.value) == ("case 'CASE1' is a labeled training case and also in the test split: a held-out case "
                            "must not be trained on (take it out of the test list or label fewer cases)")
    assert "\n" not in str(e.value)


def test_csv_row_repeated_as_test_is_the_same_file_not_the_same_name(tmp_path):
    """The same image file as an unlabeled training row and as a test row is held out; another file with the
    same name in another folder is a different case and stays in training."""
    g = Geometry(spacing=(1.0, 1.0, 1.0))
    rows = ["image,label,split"]
    for i, folder in enumerate(["a", "b", "c"]):
        (tmp_path / folder).mkdir()
        lab = np.zeros((32, 32, 8), np.uint8)
        lab[8:20, 8:20, 2:6] = 1
        write_volume(tmp_path / folder / "scan.nrrd", Volume((lab + 0.1 * i).astype(np.float32), g, "scan"))
        write_labelmap(tmp_path / folder / "scan.label.nrrd", lab, g)
    rows += ["a/scan.nrrd,a/scan.label.nrrd,train", "b/scan.nrrd,,train", "c/scan.nrrd,,train",
             "c/scan.nrrd,c/scan.label.nrrd,test"]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    splits, warnings = prepare(str(tmp_path / "data.csv"), tmp_path, dim=3)
    assert [r.sources[0] for r in splits.unlabeled] == [str((tmp_path / "b" / "scan.nrrd").resolve())]
    assert len(splits.test) == 1 and len(warnings) == 1 and warnings[0].startswith("1 unlabeled case(s) left out")
