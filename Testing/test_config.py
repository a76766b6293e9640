"""Configuration layering and the command line generated from it."""
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
    assert (la.dim, la.patch_size, la.labeled_batch, la.iterations, la.lr_schedule) == (3, (112, 112, 80), 2, 15000, "step")
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
    from semiseg.train.loop import Trainer
    cfg = resolve_config({"data": "phantom:4", "labeled": 2, "patch_size": (32, 32), "iterations": 3,
                          "method": "supervised", "device": "cpu"})
    t = Trainer(cfg, tmp_path)

    def boom(batch, step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    orig_setup = t._setup

    def setup():
        orig_setup()
        t.method.losses = boom
    t._setup = setup
    with pytest.raises(SemiSegError, match=r"out of GPU memory at iteration 0 \(patch \(32, 32\), batch 4\+4\)"):
        t.run()
