"""Each method as its authors ran it: reference records, per-method recipe details, test selection on LA,
``--protocol paper``, named recipes and the deviations table built from the same records."""
import dataclasses
import json
import math
import re
from pathlib import Path

import pytest

from semiseg.config import resolve_config
from semiseg.data.datasets import load_phantom
from semiseg.errors import SemiSegError
from semiseg.methods import METHODS, MethodContext, get_method
from semiseg.methods.reference import deviations, table_lines, undeclared
from semiseg.networks import build_network
from semiseg.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ deviations table
def test_every_method_names_its_reference_and_every_difference_is_declared():
    for name, cls in METHODS.items():
        assert cls.reference is not None and cls.reference.paper and cls.reference.code, name
        assert undeclared(name) == [], name


def test_a_default_that_changes_without_its_declaration_fails(monkeypatch):
    """The table is computed from the resolved defaults: switching AGP's 2D decoder back to transposed
    convolutions, or SS-Net's LA selection to the test set, is reported until the record changes too."""
    agp = get_method("agp")
    monkeypatch.setitem(agp.recipe, "phantom", dict(agp.recipe["phantom"], upsampling="transpose"))
    assert undeclared("agp") == ["agp phantom:upsampling: default 'transpose' differs from the reference's "
                                 "'bilinear' without a declared reason"]
    row = [r for r in deviations("agp") if r["field"] == "upsampling"]
    assert [(r["preset"], r["restore"]) for r in row] == [("phantom", "--upsampling bilinear")]
    ss = get_method("ss_net")
    monkeypatch.setitem(ss.recipe, "la", dict(ss.recipe["la"], selection="test", val_every=200, val_from=2000))
    assert sorted(undeclared("ss_net")) == sorted(
        f"ss_net la:{f}: declared difference no longer differs from the reference" for f in
        ("selection", "val_every", "val_from"))


def test_declared_default_must_match_the_resolved_one(monkeypatch):
    ss = get_method("ss_net")
    monkeypatch.setitem(ss.recipe, "la", dict(ss.recipe["la"], val_every=100))
    assert undeclared("ss_net") == ["ss_net la:val_every: declared default 0, resolved 100"]


def test_readme_section_is_the_generated_table():
    text = (ROOT / "README.md").read_text()
    section = re.search(r"<!-- deviations:start -->\n(.*)\n<!-- deviations:end -->", text, re.S).group(1)
    assert section == "\n".join(table_lines(sorted(METHODS))).rstrip("\n")


def test_methods_deviations_command_prints_the_table(capsys):
    from semiseg_trainer.cli import main
    assert main(["methods", "--deviations"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip("\n") == "\n".join(table_lines(sorted(METHODS))).rstrip("\n")
    assert "| acdc | `lr` | 0.1 | 0.01 |" in out and "`--protocol paper`" in out


# ------------------------------------------------------------------------------------ recipe details
def _method(name, preset, dim=2, iterations=30000):
    cls = get_method(name)
    cfg = resolve_config({"method": name, "preset": preset})
    net = build_network("unet", num_classes=4)
    return cls(net, cls.Options(**cfg.method_options), MethodContext(dim, 4, iterations, preset))


@pytest.mark.parametrize("preset", ["acdc", "phantom", "generic2d"])
def test_ua_mt_2d_has_no_consistency_delay_unlike_mean_teacher(preset):
    """SSL4MIS's UA-MT 2D script ramps from iteration 0; its Mean Teacher sibling waits 1000 on ACDC."""
    ua, mt = _method("ua_mt", preset), _method("mean_teacher", preset)
    ramp = min(ua.options.rampup_iterations, 30000)
    want = 0.1 * math.exp(-5 * (1 - min(900 // 150, ramp / 150) / (ramp / 150)) ** 2)
    assert ua.weight(900) == pytest.approx(want) and ua.weight(900) > 0
    if preset == "acdc":
        assert mt.weight(900) == 0.0 and mt.weight(1000) > 0


def test_ua_mt_la_recipe_is_6000_iterations_with_the_threshold_ramp_over_them():
    from semiseg.methods.ua_mt import uncertainty_threshold
    cfg = resolve_config({"method": "ua_mt", "preset": "la"})
    assert (cfg.iterations, cfg.lr_schedule, cfg.method_options["rampup_iterations"]) == (6000, "step", 6000)
    assert cfg.method_options["consistency_delay"] == 0
    # H(t) = (0.75 + 0.25·exp(-5(1 - t/6000)²))·ln 2 over the run's 6000 iterations
    assert uncertainty_threshold(3000, cfg.iterations) == pytest.approx((0.75 + 0.25 * math.exp(-1.25)) * math.log(2))
    assert uncertainty_threshold(6000, cfg.iterations) == pytest.approx(math.log(2))
    assert resolve_config({"method": "mean_teacher", "preset": "la"}).iterations == 15000  # only UA-MT's recipe


def test_icl_named_recipe_is_its_authors_train_sh():
    assert resolve_config({"method": "icl", "preset": "acdc"}).lr == 0.01
    assert resolve_config({"method": "icl", "preset": "acdc", "recipe": "train.sh"}).lr == 0.1
    assert resolve_config({"method": "icl", "preset": "acdc", "recipe": "train.sh", "lr": 0.05}).lr == 0.05
    with pytest.raises(SemiSegError, match="no recipe 'paper'.*train.sh"):
        resolve_config({"method": "icl", "preset": "acdc", "recipe": "paper"})
    with pytest.raises(SemiSegError, match="has no named recipe"):
        resolve_config({"method": "ss_net", "preset": "acdc", "recipe": "train.sh"})


def test_caml_memory_rows_default_is_the_published_one():
    assert resolve_config({"method": "caml", "preset": "la"}).method_options["memory_rows"] == "as_coded"


# ------------------------------------------------------------------------------------ selection and protocol
def test_test_selection_on_la_takes_the_reference_cadence():
    cfg = resolve_config({"method": "ss_net", "preset": "la", "selection": "test"})
    assert (cfg.selection, cfg.val_every, cfg.val_from) == ("test", 200, 2000)
    cfg = resolve_config({"method": "ss_net", "preset": "la", "selection": "test", "val_every": 500})
    assert (cfg.val_every, cfg.val_from) == (500, 0)  # an explicit cadence wins


@pytest.mark.parametrize("explicit, message", [
    ({"preset": "la", "selection": "test", "val_every": 0}, "--val-every is 0"),
    ({"preset": "la", "selection": "test", "iterations": 1000}, "first validation is at iteration 2000, after the run's 1000"),
    ({"preset": "la", "selection": "val"}, "--val-every is 0"),
    ({"preset": "phantom", "selection": "val", "iterations": 50}, "first validation is at iteration 100"),
    ({"preset": "generic3d", "selection": "test", "val_every": 0}, "--val-every is 0"),
])
def test_a_selection_that_cannot_happen_is_one_error(explicit, message):
    with pytest.raises(SemiSegError, match=re.escape(message)):
        resolve_config({"method": "ss_net", **explicit})


def test_a_presets_own_val_selection_without_validation_is_labelled_final():
    cfg = resolve_config({"method": "supervised", "preset": "phantom", "val_every": 0})
    assert cfg.selection == "final"


def test_paper_protocol_per_method():
    ss = resolve_config({"method": "ss_net", "preset": "la", "protocol": "paper"})
    assert (ss.selection, ss.val_every, ss.val_from, ss.lcc, ss.empty) == ("test", 200, 2000, True, "zero")
    caml = resolve_config({"method": "caml", "preset": "la", "protocol": "paper"})
    assert (caml.selection, caml.lcc, caml.empty) == ("final", False, "zero")
    icl = resolve_config({"method": "icl", "preset": "acdc", "protocol": "paper"})
    assert (icl.selection, icl.val_every, icl.empty) == ("test", 200, "penalty")
    agp = resolve_config({"method": "agp", "preset": "acdc", "protocol": "paper"})
    assert (agp.selection, agp.val_every) == ("test", 98)
    honest = resolve_config({"method": "ss_net", "preset": "la"})
    assert (honest.protocol, honest.selection, honest.lcc) == ("semiseg", "final", False)


@pytest.mark.parametrize("explicit, message", [
    ({"method": "lcc", "preset": "la"}, "no published protocol of 'lcc' on la data"),
    ({"method": "agp", "preset": "la"}, "no published protocol of 'agp' on la data"),
    ({"method": "ss_net", "preset": "phantom"}, "no published protocol of 'ss_net' on phantom data"),
    ({"method": "ss_net", "preset": "la", "lcc": False}, "sets lcc = True for ss_net on la; False was also given"),
])
def test_paper_protocol_that_does_not_exist_or_clashes_is_one_error(explicit, message):
    with pytest.raises(SemiSegError, match=re.escape(message)):
        resolve_config({**explicit, "protocol": "paper"})


def test_test_selection_validates_on_the_test_split_from_val_from_and_says_so(tmp_path):
    """A real run: validations only at multiples of val_every from val_from, on the test split; the
    reported checkpoint is the best of those and the summary names the protocol."""
    cfg = resolve_config({"data": "phantom:3", "labeled": 1, "method": "supervised", "patch_size": (32, 32),
                          "labeled_batch": 2, "iterations": 6, "val_every": 2, "val_from": 3, "selection": "test",
                          "checkpoint_every": 100, "log_every": 1, "deterministic": True, "device": "cpu",
                          "threads": 1})
    summary = Trainer(cfg, tmp_path, data=load_phantom(3, 1, n_val=1, n_test=1)).run()
    events = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    vals = [e for e in events if e["event"] == "validation"]
    assert [(e["iteration"], e["split"]) for e in vals] == [(4, "test"), (6, "test")]
    assert summary["selected_iteration"] in (4, 6) and summary["protocol"] == "SemiSeg protocol (test-selected)"
    best = max(vals, key=lambda e: e["dice"])
    assert summary["selected_iteration"] == best["iteration"]


def test_paper_protocol_label_in_the_summary(tmp_path):
    from semiseg.methods.reference import protocol_label
    assert protocol_label("paper", "test") == "paper protocol (test-selected)"
    assert protocol_label("semiseg", "final") == "SemiSeg protocol (final-selected)"
