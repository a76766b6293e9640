"""Precision and memory-format options of the training loop: bf16 autocast (also on the CPU) trains to the
same validation Dice as fp32 within a stated tolerance, the precision choice is resolved as documented,
channels-last changes the layout and not the result, and torch.compile keeps checkpoint keys plain."""
import pytest
import torch

from semiseg.config import resolve_config
from semiseg.errors import SemiSegError
from semiseg.train.loop import Trainer, resolve_precision

TINY = {"data": "phantom:6", "labeled": 2, "method": "supervised", "patch_size": (32, 32), "labeled_batch": 2,
        "iterations": 3, "val_every": 0, "log_every": 1, "device": "cpu", "threads": 1, "deterministic": True}


def test_precision_resolution():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", True, cpu) is None  # fp32 on the CPU unless asked
    assert resolve_precision("fp32", True, cpu) is None
    assert resolve_precision("bf16", False, cpu) is torch.bfloat16  # bf16 autocast on the CPU when asked
    with pytest.raises(SemiSegError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", True, cpu)
    with pytest.raises(SemiSegError, match="precision must be"):
        resolve_config(dict(TINY, precision="int8"))


def test_bf16_autocast_reaches_the_network():
    """The training step runs the student's convolutions in bfloat16 under precision=bf16, fp32 otherwise."""
    seen = {}
    for prec in ("bf16", "fp32"):
        tr = Trainer(resolve_config(dict(TINY, precision=prec)), "/nonexistent-unused")
        tr._setup()
        conv = next(m for m in tr.method.student.modules() if isinstance(m, torch.nn.Conv2d))
        def hook(module, inputs, output, p=prec):
            seen.setdefault(p, output.dtype)  # returns None: the output is left unchanged

        h = conv.register_forward_hook(hook)
        terms, _ = tr.train_step(tr.next_batch(), 0)
        h.remove()
        assert terms["loss"].dtype == torch.float32  # the loss itself is reduced in fp32
    assert seen == {"bf16": torch.bfloat16, "fp32": torch.float32}


def test_bf16_training_matches_fp32_dice():
    """Supervised UNet on the phantom, 100 iterations at 48x48, batch 4, seed 1337, deterministic, 1 thread:
    the final validation Dice with bf16 autocast (CPU) is within 0.03 of fp32. Measured on this machine:
    fp32 0.709, bf16 0.712 (|Δ| = 0.003; at 150 iterations 0.745 vs 0.744, at 80 iterations 0.545 vs 0.555)."""
    dice = {}
    for prec in ("fp32", "bf16"):
        cfg = resolve_config({"data": "phantom:8", "labeled": 4, "method": "supervised", "patch_size": (48, 48),
                              "labeled_batch": 4, "iterations": 100, "val_every": 0, "log_every": 50,
                              "device": "cpu", "threads": 1, "deterministic": True, "precision": prec, "lr": 0.03})
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            dice[prec] = Trainer(cfg, d).run()["val"]["mean"]["dice"]
    assert dice["fp32"] > 0.6 and dice["bf16"] > 0.6, dice  # both learned: the comparison is not vacuous
    assert abs(dice["fp32"] - dice["bf16"]) < 0.03, dice


def test_channels_last_same_losses(tmp_path):
    """channels_last converts the convolution weights and batches; with dropout off (its random masks are drawn
    in memory order, so they differ between layouts) three training steps give the same losses."""
    losses = {}
    for cl in (False, True):
        tr = Trainer(resolve_config(dict(TINY, channels_last=cl)), tmp_path / str(cl))
        tr._setup()
        conv = next(m for m in tr.method.student.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == cl
        for m in tr.method.student.modules():  # dropout masks follow the memory layout: switch them off
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        losses[cl] = [float(tr.train_step(tr.next_batch(), s)[0]["loss"].detach()) for s in range(3)]
    assert losses[False] == pytest.approx(losses[True], rel=1e-4, abs=1e-5)


def test_compile_keeps_checkpoint_keys_plain(tmp_path):
    plain = Trainer(resolve_config(TINY), tmp_path / "a")
    plain._setup()
    comp = Trainer(resolve_config(dict(TINY, compile=True)), tmp_path / "b")
    comp._setup()  # nn.Module.compile is lazy: nothing is compiled until the first forward
    assert comp.method.student._compiled_call_impl is not None
    keys = list(comp._model_payload(0, {})["model"])
    assert keys == list(plain._model_payload(0, {})["model"])
    assert not any("_orig_mod" in k for k in keys)
