"""Classes matched across label files (semiseg.data.classes.match_label_classes, datasets.load_files, the
``class_map`` option): real files written by the engine's writers and slicerio."""
import json

import numpy as np
import pytest
import slicerio

from semiseg.config import TrainConfig
from semiseg.data.datasets import load_dataset
from semiseg.data.classes import match_label_classes, normalize_class_name, parse_class_map, read_label
from semiseg.data.io import write_labelmap, write_volume
from semiseg.data.segfile import write_segmentation
from semiseg.data.volume import ClassInfo, Geometry, Volume
from semiseg.errors import SemiSegError

GEOM = Geometry((1.5, 1.5, 2.0), (10.0, -20.0, 5.0), (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
SHAPE = (12, 10, 6)


def labelmap(index: int, values=(1, 2, 3)) -> np.ndarray:
    """A distinct labelmap per case: value v fills a block whose position depends on the case."""
    a = np.zeros(SHAPE, dtype=np.uint8)
    for k, v in enumerate(values):
        a[1 + 3 * k: 3 + 3 * k, 1 + index % 3: 6 + index % 3, 1: 4 + k % 2] = v
    return a


def write_case(folder, index, names, values=(1, 2, 3), colors=None, as_labelmap=False):
    """Image + label for case ``index``; segment i is named names[i] and has label value values[i]."""
    folder.mkdir(exist_ok=True)
    lab = labelmap(index, values)
    rng = np.random.default_rng(index)
    write_volume(folder / f"c{index}.nrrd", Volume(rng.normal(size=SHAPE).astype(np.float32), GEOM))
    if as_labelmap:
        path = folder / f"c{index}.label.nrrd"
        write_labelmap(path, lab, GEOM)
    else:
        path = folder / f"c{index}.seg.nrrd"
        colors = colors or [(0.1 * (i + 1), 0.5, 0.5) for i in range(len(names))]
        write_segmentation(path, lab, GEOM, [ClassInfo(v, n, c) for v, n, c in zip(values, names, colors)])
    return path, lab


NAMES = ["right ventricle", "myocardium", "left ventricle"]


# ------------------------------------------------------------------------------------ parsing
def test_parse_class_map_forms(tmp_path):
    expected = {"lv cavity": "left ventricle", "lv": "left ventricle", "4": "kidney"}
    assert parse_class_map(" LV cavity = left ventricle; lv=left  ventricle;\n4=kidney ") == expected
    assert parse_class_map('{"LV Cavity": "left ventricle", "lv": "left ventricle", "4": "kidney"}') == expected
    f = tmp_path / "map.json"
    f.write_text(json.dumps({"LV cavity": "left ventricle", "LV": "left ventricle", "4": "kidney"}))
    assert parse_class_map(str(f)) == expected
    assert parse_class_map("") == {}
    with pytest.raises(SemiSegError, match="'oops' is not 'source=class'"):
        parse_class_map("a=b; oops")
    with pytest.raises(SemiSegError, match="maps 'LV' twice"):
        parse_class_map("lv=left ventricle; LV=right ventricle")
    with pytest.raises(SemiSegError, match="class_map file not found"):
        parse_class_map(str(tmp_path / "missing.json"))
    assert normalize_class_name("  Left   Ventricle ") == "left ventricle"


def test_class_map_is_a_config_field_and_cli_option():
    assert TrainConfig().class_map == ""
    assert TrainConfig.from_dict({"class_map": "a=b"}).class_map == "a=b"
    import argparse
    from semiseg_trainer.options import add_train_options, split_args
    parser = argparse.ArgumentParser()
    add_train_options(parser, "supervised")
    assert split_args(parser.parse_args(["--class-map", "LV cavity=left ventricle"]))["class_map"] == \
        "LV cavity=left ventricle"


# ------------------------------------------------------------------------------------ errors
def test_mismatched_segment_names_give_one_line_error_naming_files_and_names(tmp_path):
    d = tmp_path / "data"
    a, _ = write_case(d, 0, NAMES)
    b, _ = write_case(d, 1, ["right ventricle", "myocardium", "LV cavity"])
    with pytest.raises(SemiSegError) as e:
        load_dataset(str(d), labeled=2)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{b} lacks 'left ventricle' which {a} has" in msg
    assert f"{b} has 'LV cavity' which {a} lacks" in msg
    assert f"value 3 is 'left ventricle' in {a} but 'LV cavity' in {b}" in msg
    assert "class_map" in msg


def test_missing_and_extra_segment_are_errors(tmp_path):
    d = tmp_path / "data"
    a, _ = write_case(d, 0, NAMES)
    b, _ = write_case(d, 1, NAMES[:2], values=(1, 2))
    with pytest.raises(SemiSegError, match=f"{b} lacks 'left ventricle' which {a} has; fix it with the class_map"):
        load_dataset(str(d), labeled=2)
    d2 = tmp_path / "data2"
    a, _ = write_case(d2, 0, NAMES[:2], values=(1, 2))
    b, _ = write_case(d2, 1, NAMES)
    with pytest.raises(SemiSegError, match=f"{b} has 'left ventricle' which {a} lacks"):
        load_dataset(str(d2), labeled=2)


def test_validation_file_disagreeing_is_caught_before_training(tmp_path):
    d = tmp_path / "data"
    write_case(d, 0, NAMES)
    _, _ = write_case(d, 1, ["RV", "myocardium", "left ventricle"])
    # --labeled 1: the second case validates; its label is checked at load time all the same
    with pytest.raises(SemiSegError, match="lacks 'right ventricle'"):
        load_dataset(str(d), labeled=1)


# ------------------------------------------------------------------------------------ fixes
def test_class_map_fixes_mismatch_with_correct_voxel_values(tmp_path):
    d = tmp_path / "data"
    _, lab0 = write_case(d, 0, NAMES)
    # case 1 names the LV differently, in another file order and with other label values
    _, lab1 = write_case(d, 1, ["LV cavity", "right ventricle", "myocardium"], values=(7, 1, 2))
    data = load_dataset(str(d), labeled=2, class_map="LV cavity = left ventricle")
    assert [(c.value, c.name) for c in data.classes] == [(1, "right ventricle"), (2, "myocardium"),
                                                        (3, "left ventricle")]
    np.testing.assert_array_equal(data.labeled[0].label().array, lab0)
    got = data.labeled[1].label().array
    expected = np.select([lab1 == 7, lab1 == 1, lab1 == 2], [3, 1, 2], 0)
    np.testing.assert_array_equal(got, expected)
    assert set(np.unique(got)) == {0, 1, 2, 3}


def test_case_insensitive_and_whitespace_match(tmp_path):
    d = tmp_path / "data"
    _, lab0 = write_case(d, 0, NAMES)
    _, lab1 = write_case(d, 1, ["Right Ventricle ", "MYOCARDIUM", " left  ventricle"], values=(3, 1, 2))
    data = load_dataset(str(d), labeled=2)
    assert [c.name for c in data.classes] == NAMES
    got = data.labeled[1].label().array
    np.testing.assert_array_equal(got, np.select([lab1 == 3, lab1 == 1, lab1 == 2], [1, 2, 3], 0))


def test_class_map_background_drops_a_segment(tmp_path):
    d = tmp_path / "data"
    _, lab0 = write_case(d, 0, NAMES)
    _, lab1 = write_case(d, 1, NAMES)
    data = load_dataset(str(d), labeled=2, class_map="myocardium=background")
    assert [(c.value, c.name) for c in data.classes] == [(1, "right ventricle"), (2, "left ventricle")]
    np.testing.assert_array_equal(data.labeled[1].label().array, np.select([lab1 == 1, lab1 == 3], [1, 2], 0))


def test_class_map_from_json_file_merges_two_names(tmp_path):
    d = tmp_path / "data"
    write_case(d, 0, ["liver", "tumour", "vessel"])
    _, lab1 = write_case(d, 1, ["Liver", "lesion", "hepatic vessel"])
    m = tmp_path / "map.json"
    m.write_text(json.dumps({"lesion": "tumour", "hepatic vessel": "liver", "vessel": "liver"}))
    data = load_dataset(str(d), labeled=2, class_map=str(m))
    assert [(c.value, c.name) for c in data.classes] == [(1, "liver"), (2, "tumour")]
    np.testing.assert_array_equal(data.labeled[1].label().array,
                                  np.select([lab1 == 1, lab1 == 2, lab1 == 3], [1, 2, 1], 0))


# ------------------------------------------------------------------------------------ labelmaps
def test_labelmaps_match_by_value_union_and_renumbered(tmp_path):
    d = tmp_path / "data"
    _, lab0 = write_case(d, 0, None, values=(1, 4), as_labelmap=True)
    _, lab1 = write_case(d, 1, None, values=(4, 6), as_labelmap=True)
    data = load_dataset(str(d), labeled=2)
    # union of values present, numbered 1..K for the network's channels
    assert [(c.value, c.name) for c in data.classes] == [(1, "class_1"), (2, "class_4"), (3, "class_6")]
    np.testing.assert_array_equal(data.labeled[0].label().array, np.select([lab0 == 1, lab0 == 4], [1, 2], 0))
    np.testing.assert_array_equal(data.labeled[1].label().array, np.select([lab1 == 4, lab1 == 6], [2, 3], 0))
    named = load_dataset(str(d), labeled=2, class_map="1=liver; 4=kidney; 6=kidney")
    assert [(c.value, c.name) for c in named.classes] == [(1, "liver"), (2, "kidney")]
    np.testing.assert_array_equal(named.labeled[1].label().array, np.select([lab1 == 4, lab1 == 6], [2, 2], 0))


def test_contiguous_labelmaps_are_unchanged(tmp_path):
    d = tmp_path / "data"
    _, lab0 = write_case(d, 0, None, as_labelmap=True)
    _, lab1 = write_case(d, 1, None, values=(1, 2), as_labelmap=True)
    data = load_dataset(str(d), labeled=2)
    assert [(c.value, c.name) for c in data.classes] == [(1, "class_1"), (2, "class_2"), (3, "class_3")]
    np.testing.assert_array_equal(data.labeled[0].label().array, lab0)
    np.testing.assert_array_equal(data.labeled[1].label().array, lab1)


def test_labelmap_matched_by_value_to_a_segmentation(tmp_path):
    d = tmp_path / "data"
    a, _ = write_case(d, 0, ["liver", "kidney"], values=(2, 5))
    _, lab1 = write_case(d, 1, None, values=(5, 2), as_labelmap=True)
    data = load_dataset(str(d), labeled=2)
    assert [(c.value, c.name) for c in data.classes] == [(1, "liver"), (2, "kidney")]
    np.testing.assert_array_equal(data.labeled[1].label().array, np.select([lab1 == 2, lab1 == 5], [1, 2], 0))
    # a value the segmentation does not define
    b, _ = write_case(d, 2, None, values=(2, 9), as_labelmap=True)
    with pytest.raises(SemiSegError, match=rf"label value 9 in {b} is none of the values of {a} \(2: liver, 5: kidney\)"):
        load_dataset(str(d), labeled=3)
    # ... mapped explicitly
    data = load_dataset(str(d), labeled=3, class_map="9=kidney")
    _, lab2 = write_case(d, 2, None, values=(2, 9), as_labelmap=True)
    np.testing.assert_array_equal(data.labeled[2].label().array, np.select([lab2 == 2, lab2 == 9], [1, 2], 0))


def test_slicer_written_segmentation_with_other_ids_and_layers(tmp_path):
    """A segmentation written with slicerio directly (Slicer's own IDs, two layers, non-default values)."""
    d = tmp_path / "data"
    _, lab0 = write_case(d, 0, NAMES)
    lab1 = labelmap(1)
    layers = np.stack([(lab1 == 1) * 1 + (lab1 == 3) * 2, (lab1 == 2) * 1]).astype(np.uint8)
    seg = slicerio.create_segmentation(SHAPE, GEOM.ijk_to_lps(), dtype=np.uint8)
    seg["voxels"] = layers
    seg["segments"] = [
        {"id": "Segment_a", "name": "Right ventricle", "labelValue": 1, "layer": 0, "color": [1, 0, 0]},
        {"id": "Segment_b", "name": "LV blood pool", "labelValue": 2, "layer": 0, "color": [0, 1, 0]},
        {"id": "Segment_c", "name": "Myocardium", "labelValue": 1, "layer": 1, "color": [0, 0, 1]},
    ]
    write_volume(d / "c1.nrrd", Volume(np.zeros(SHAPE, np.float32), GEOM))
    slicerio.write_segmentation(str(d / "c1.seg.nrrd"), seg)
    with pytest.raises(SemiSegError, match="has 'LV blood pool' which"):
        load_dataset(str(d), labeled=2)
    data = load_dataset(str(d), labeled=2, class_map="LV blood pool=left ventricle")
    np.testing.assert_array_equal(data.labeled[1].label().array, lab1)


def test_match_label_classes_mapping_feeds_read_label(tmp_path):
    d = tmp_path / "data"
    a, _ = write_case(d, 0, NAMES)
    b, lab1 = write_case(d, 1, ["left ventricle", "right ventricle", "myocardium"])
    classes, mappings = match_label_classes([str(a), str(b)])
    assert mappings[str(b)] == {"left ventricle": 3, "right ventricle": 1, "myocardium": 2}
    vol, out_classes = read_label(b, classes, mappings[str(b)])
    assert [c.name for c in out_classes] == NAMES
    np.testing.assert_array_equal(vol.array, np.select([lab1 == 1, lab1 == 2, lab1 == 3], [3, 1, 2], 0))
    with pytest.raises(ValueError):
        read_label(b, None, mappings[str(b)])


def test_class_map_rejected_for_builtin_data():
    with pytest.raises(SemiSegError, match="class_map applies to a folder"):
        load_dataset("phantom", labeled=2, class_map="a=b")


def test_training_loop_uses_class_map(tmp_path):
    from semiseg.checkpoint import load_checkpoint
    from semiseg.config import resolve_config
    from semiseg.run import load_run_data
    from semiseg.train.loop import Trainer
    d = tmp_path / "data"
    write_case(d, 0, NAMES)
    write_case(d, 1, ["right ventricle", "myocardium", "LV cavity"])
    cfg = {"data": str(d), "labeled": 1, "method": "supervised", "dim": 3, "patch_size": (16, 16, 16),
           "labeled_batch": 2, "iterations": 2, "val_every": 0, "device": "cpu", "threads": 1,
           "deterministic": True, "stride": (8, 8, 8)}
    with pytest.raises(SemiSegError, match="label files disagree on the classes"):
        run_cfg = resolve_config(cfg)
        Trainer(run_cfg, tmp_path / "a", load_run_data(run_cfg)).run()
    run_cfg = resolve_config(dict(cfg, class_map="LV cavity=left ventricle"))
    Trainer(run_cfg, tmp_path / "b", load_run_data(run_cfg)).run()
    meta = load_checkpoint(tmp_path / "b" / "best.pt")["meta"]
    assert [(c["value"], c["name"]) for c in meta["classes"]] == [(1, "right ventricle"), (2, "myocardium"),
                                                                  (3, "left ventricle")]


def test_label_key_changes_with_the_class_map(tmp_path):
    """The loaded label depends on the class matching, so caches keyed on the files need this key too."""
    d = tmp_path / "data"
    write_case(d, 0, ["liver", "tumour", "vessel"])
    write_case(d, 1, ["liver", "tumour", "vessel"])
    plain = load_dataset(str(d), labeled=2)
    dropped = load_dataset(str(d), labeled=2, class_map="vessel=background")
    assert plain.labeled[1].label_key and plain.labeled[1].label_key != dropped.labeled[1].label_key
    assert plain.labeled[1].label_key == load_dataset(str(d), labeled=2).labeled[1].label_key
    assert plain.labeled[1].sources == dropped.labeled[1].sources
