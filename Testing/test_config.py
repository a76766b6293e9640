"""Configuration layering and the command line generated from it."""
import json

import pytest
import torch

from semiseg.config import resolve_config
from semiseg.errors import SemiSegError
from semiseg_trainer.cli import build_parser, build_train_config


def parse(*argv, method="mean_teacher"):
    return build_train_config(build_parser(method).parse_args(["train", "--out", "x", *argv]))


def test_presets_give_the_literature_recipes():
    acdc = resolve_config({"data": "acdc:/x", "method": "mean_teacher"})
    assert (acdc.dim, acdc.patch_size, acdc.labeled_batch, acdc.unlabeled_batch, acdc.iterations) == (2, (256, 256), 12, 12, 30000)
    assert (acdc.lr_schedule, acdc.val_every, acdc.selection, acdc.network) == ("poly", 200, "val", "unet")
    assert acdc.method_options["rampup_iterations"] == 30000 and acdc.method_options["consistency_delay"] == 1000
    la = resolve_config({"data": "la:/x", "method": "ua_mt"})
    # UA-MT's own LA run is 6000 iterations; the preset's 15000 is the SS-Net era's (mean_teacher keeps it)
    assert (la.dim, la.patch_size, la.labeled_batch, la.iterations, la.lr_schedule) == (3, (112, 112, 80), 2, 6000, "step")
    assert resolve_config({"data": "la:/x", "method": "mean_teacher"}).iterations == 15000
    assert (la.stride, la.selection, la.network) == ((18, 18, 4), "final", "vnet")
    assert la.method_options["rampup_iterations"] == 6000 and la.method_options["consistency_delay"] == 0


def test_precedence_preset_file_command_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data: acdc:/x\niterations: 500\nlr: 0.05\nmethod_options:\n  consistency: 0.3\n")
    cfg = build_train_config(build_parser("mean_teacher").parse_args(
        ["train", "--out", "x", "--config", str(f), "--lr", "0.02", "--noise-std", "0.05"]))
    assert cfg.iterations == 500 and cfg.lr == 0.02 and cfg.patch_size == (256, 256)  # file, CLI, preset
    assert cfg.method_options["consistency"] == 0.3 and cfg.method_options["noise_std"] == 0.05


def test_every_method_option_is_a_command_line_option():
    cfg = parse("--data", "phantom", "--method", "ua_mt", "--mc-passes", "4", "--threshold-base", "0.5", "--patch-size", "64", "64",
                "--no-amp", method="ua_mt")
    assert cfg.method_options["mc_passes"] == 4 and cfg.method_options["threshold_base"] == 0.5
    assert cfg.patch_size == (64, 64) and cfg.amp is False


def test_unknown_keys_are_errors(tmp_path):
    with pytest.raises(SemiSegError, match="unknown configuration keys: colour"):
        resolve_config({"colour": 1})
    with pytest.raises(SemiSegError, match="has no option"):
        resolve_config({"method": "supervised", "method_options": {"consistency": 1.0}})


def test_out_of_memory_becomes_one_clear_line(tmp_path, monkeypatch):
    from semiseg.run import load_run_data
    from semiseg.train.loop import Trainer
    cfg = resolve_config({"data": "phantom:4", "labeled": 2, "patch_size": (32, 32), "iterations": 3,
                          "method": "supervised", "device": "cpu"})
    t = Trainer(cfg, tmp_path, load_run_data(cfg))

    def boom(batch, step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    orig_setup = t.setup

    def setup():
        orig_setup()
        t.method.losses = boom
    t.setup = setup
    with pytest.raises(SemiSegError, match=r"out of GPU memory at iteration 0 \(patch \(32, 32\), batch 4\+4\)"):
        t.run()


# ------------------------------------------------------------------ the matched supervised baseline
def _method_labeled_term(method, options, dim, logits, label):
    """Each method's supervised term, computed by the method's own code."""
    from types import SimpleNamespace
    from semiseg.losses import supervised_loss
    from semiseg.methods.caml import CAML
    from semiseg.methods.common import labeled_loss
    from semiseg.methods.ss_net import ssnet_supervised_loss
    if method in ("ss_net", "lcc"):
        return ssnet_supervised_loss(logits, label, options["sup_loss"], options["dice"], dim)
    if method == "caml":  # CAML.supervised reads only options.dice and ctx.dim
        me = SimpleNamespace(options=SimpleNamespace(dice=options["dice"]), ctx=SimpleNamespace(dim=dim))
        return CAML.supervised(me, torch.softmax(logits, 1), label)
    if method in ("icl", "icl_lite"):
        return supervised_loss(logits, label, "ce_plus_dice", "multiclass")
    return labeled_loss(logits, label, SimpleNamespace(**options), dim)


@pytest.mark.parametrize("method,data", [("mean_teacher", "phantom"), ("ua_mt", "la:/x"), ("unimatch", "phantom"),
                                         ("agp", "acdc:/x"), ("ss_net", "phantom"), ("lcc", "la:/x"),
                                         ("caml", "phantom"), ("caml", "la:/x"), ("icl_lite", "phantom")])
def test_matched_supervised_baseline_differs_from_the_method_only_in_the_unlabeled_terms(method, data):
    from dataclasses import asdict
    from semiseg.config import matched_supervised
    from semiseg.methods.common import labeled_loss
    from types import SimpleNamespace
    cfg = resolve_config({"data": data, "method": method})
    base = matched_supervised(cfg)
    a, b = asdict(cfg), asdict(base)
    assert base.method == "supervised" and {k for k in a if a[k] != b[k]} <= {"method", "method_options"}
    assert set(base.method_options) == {"sup_loss", "dice"}
    # the baseline's loss is the method's labeled term (SS-Net's 2D Dice smoothing 1e-10 vs 1e-5 aside)
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, 6, 6) + ((5,) if cfg.dim == 3 else ())
    logits = torch.randn(shape, generator=g) * 2
    label = torch.randint(0, 3, (shape[0],) + shape[2:], generator=g)
    ours = labeled_loss(logits, label, SimpleNamespace(**base.method_options), cfg.dim)
    theirs = _method_labeled_term(method, cfg.method_options, cfg.dim, logits, label)
    assert float(ours) == pytest.approx(float(theirs), abs=1e-4), (method, base.method_options)


def test_the_default_supervised_recipe_is_not_the_matched_baseline_of_unimatch():
    """Why the matched baseline exists: the dataset's default supervised run infers with nearest resize and
    trains ½(CE+Dice); UniMatch's baseline keeps its bilinear logit resize and the decoder it was given,
    SS-Net's its Dice-only loss and bilinear decoder."""
    from semiseg.config import matched_supervised
    default = resolve_config({"data": "phantom", "method": "supervised"})
    uni = matched_supervised(resolve_config({"data": "phantom", "method": "unimatch"}))
    ss = matched_supervised(resolve_config({"data": "phantom", "method": "ss_net"}))
    assert (default.resize, uni.resize, uni.upsampling) == ("nearest", "bilinear", "bilinear")
    uni_t = matched_supervised(resolve_config({"data": "phantom", "method": "unimatch", "upsampling": "transpose"}))
    assert (default.upsampling, uni_t.upsampling) == ("bilinear", "transpose")
    assert ss.method_options["sup_loss"] == "dice" and ss.upsampling == "bilinear"
    assert default.method_options["sup_loss"] == "half_ce_dice"


def test_train_baseline_flag_trains_the_matched_supervised_run(tmp_path):
    from semiseg.checkpoint import load_checkpoint
    from semiseg_trainer.cli import main
    out = tmp_path / "run"
    assert main(["--json", "train", "--data", "phantom:3", "--labeled", "1", "--method", "unimatch", "--baseline",
                 "--upsampling", "transpose", "--iterations", "2", "--patch-size", "32", "32", "--labeled-batch", "1", "--unlabeled-batch", "1",
                 "--val-every", "0", "--threads", "1", "--device", "cpu", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["method"], cfg["resize"], cfg["upsampling"]) == ("supervised", "bilinear", "transpose")
    assert cfg["method_options"] == {"sup_loss": "half_ce_dice", "dice": "auto"}
    ck = load_checkpoint(out / "best.pt")
    assert ck["network"]["upsampling"] == "transpose" and ck["meta"]["resize"] == "bilinear"


def test_largest_component_option_and_its_lcc_alias():
    """--largest-component (train, segment, evaluate) sets the largest-connected-component post-processing;
    --lcc is the same option under its old name; neither selects the lcc method."""
    from semiseg_trainer.cli import build_parser
    from semiseg_trainer.options import split_args
    parser = build_parser("mean_teacher")
    for flag, value in (("--largest-component", True), ("--lcc", True), ("--no-largest-component", False)):
        train = parser.parse_args(["train", "--out", "o", flag])
        assert split_args(train) == {"lcc": value} and resolve_config(split_args(train)).method == "mean_teacher"
        seg = parser.parse_args(["segment", "--model", "m", "--input", "x", "--out", "o", flag])
        ev = parser.parse_args(["evaluate", "--model", "m", "--data", "phantom", flag])
        assert seg.lcc is value and ev.lcc is value
    assert parser.parse_args(["segment", "--model", "m", "--input", "x", "--out", "o"]).lcc is None  # as trained

