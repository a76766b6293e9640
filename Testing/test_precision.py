"""Precision and memory-format options of the training loop: bf16 autocast (also on the CPU) trains to the
same validation Dice as fp32 within a stated tolerance, the precision choice is resolved as documented,
channels-last changes the layout and not the result, and torch.compile keeps checkpoint keys plain."""
import pytest
import torch

from semiseg.config import resolve_config
from semiseg.run import load_run_data
from semiseg.errors import SemiSegError
from semiseg.train.loop import Trainer, resolve_precision

TINY = {"data": "phantom:6", "labeled": 2, "method": "supervised", "patch_size": (32, 32), "labeled_batch": 2,
        "iterations": 3, "val_every": 0, "log_every": 1, "device": "cpu", "threads": 1, "deterministic": True}


def test_precision_resolution():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", False, cpu) is None  # no amp: fp32 (auto on a CPU: Testing/test_machine.py)
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
        run_cfg = resolve_config(dict(TINY, precision=prec))
        tr = Trainer(run_cfg, "/nonexistent-unused", load_run_data(run_cfg))
        tr.setup()
        conv = next(m for m in tr.method.student.modules() if isinstance(m, torch.nn.Conv2d))
        def hook(module, inputs, output, p=prec):
            seen.setdefault(p, output.dtype)  # returns None: the output is left unchanged

        h = conv.register_forward_hook(hook)
        terms, _ = tr.train_step(tr.next_batch(), 0)
        h.remove()
        assert terms["loss"].dtype == torch.float32  # the loss itself is reduced in fp32
    assert seen == {"bf16": torch.bfloat16, "fp32": torch.float32}


def test_bf16_training_matches_fp32_dice():
    """Supervised UNet (transposed-conv decoder) on the phantom, 200 iterations at 48x48, batch 4, seed 1337,
    deterministic, 1 thread: the final validation Dice with bf16 autocast (CPU) is within 0.03 of fp32. 200
    iterations: past the early phase where single runs of either precision still differ by up to 0.05 (differences
    below 0.01 over three seeds at 200)."""
    dice = {}
    for prec in ("fp32", "bf16"):
        cfg = resolve_config({"data": "phantom:8", "labeled": 4, "method": "supervised", "patch_size": (48, 48),
                              "labeled_batch": 4, "iterations": 200, "val_every": 0, "log_every": 50,
                              "device": "cpu", "threads": 1, "deterministic": True, "precision": prec, "lr": 0.03,
                              "upsampling": "transpose"})
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            dice[prec] = Trainer(cfg, d, load_run_data(cfg)).run()["val"]["mean"]["dice"]
    assert dice["fp32"] > 0.6 and dice["bf16"] > 0.6, dice  # both learned: the comparison is not vacuous
    assert abs(dice["fp32"] - dice["bf16"]) < 0.03, dice


DROPOUT = (torch.nn.Dropout, torch.nn.Dropout2d, torch.nn.Dropout3d)
TINY_MT = dict(TINY, method="mean_teacher", unlabeled_batch=2)
TINY_3D = dict(TINY, data="phantom:3", labeled=1, dim=3, network="vnet", patch_size=(32, 32, 16), labeled_batch=1,
               unlabeled_batch=1, method="mean_teacher")


def _step_without_dropout(cfg, out, step=0):
    """Set up a Trainer, switch dropout off (its masks are drawn in memory order, so they differ between
    layouts), run one training step; returns the trainer, its loss terms and the student's flat gradient."""
    tr = Trainer(cfg, out, load_run_data(cfg))
    tr.setup()
    for m in tr.method.modules():
        if isinstance(m, DROPOUT):
            m.p = 0.0
    terms, _ = tr.train_step(tr.next_batch(), step)
    grad = torch.cat([p.grad.flatten() for p in tr.method.student.parameters() if p.grad is not None])
    return tr, {k: float(v.detach()) for k, v in terms.items()}, grad


@pytest.mark.parametrize("base,conv_type,layout,loss_rel,grad_rel,cosine", [
    (TINY_MT, torch.nn.Conv2d, torch.channels_last, 1e-4, 1e-3, 0.99999),
    (TINY_3D, torch.nn.Conv3d, torch.channels_last_3d, 1e-3, 3e-2, 0.998)], ids=["2d-unet", "3d-vnet"])
def test_channels_last_same_losses_and_gradients(tmp_path, base, conv_type, layout, loss_rel, grad_rel, cosine):
    """channels_last (the default; NHWC in 2D, NDHWC in 3D) converts the convolution weights, the teacher's
    included, and the network's features run in that layout; with dropout off the first step's gradients agree
    within fp32 rounding and three steps give the same losses. The 3D tolerance is wider: PyTorch's channels-last
    CPU batch norm sums less exactly (3e-6 on a normalised output here, 1e-7 contiguous) and the freshly initialised
    V-Net amplifies any rounding in its gradient (contiguous fp32 is already 1e-3 of the largest component away
    from float64). Measured in 3D: 1e-2 of the largest component, cosine 0.9992 (what bf16 autocast gives), losses
    2e-4 apart after three steps; in 2D: 1e-6, cosine 1 - 2e-12, 4e-6."""
    losses, grads = {}, {}
    for cl in (False, True):
        cfg = resolve_config(dict(base, channels_last=cl, precision="fp32"))
        tr, terms, grads[cl] = _step_without_dropout(cfg, tmp_path / str(cl))
        for net in [tr.method.teacher, tr.method.student]:  # the student's conv stays in `conv`
            conv = next(m for m in net.modules() if isinstance(m, conv_type) and m.in_channels > 1)
            assert conv.weight.is_contiguous(memory_format=layout) == cl
        seen = []  # the layout of the features inside the network during the steps
        hook = conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=layout)))
        losses[cl] = [terms["loss"]] + [float(tr.train_step(tr.next_batch(), s)[0]["loss"].detach()) for s in (1, 2)]
        hook.remove()
        assert seen and all(v == cl for v in seen)
    assert losses[False] == pytest.approx(losses[True], rel=loss_rel, abs=1e-5)
    scale = grads[False].abs().max()
    assert (grads[True] - grads[False]).abs().max() < grad_rel * scale
    assert torch.nn.functional.cosine_similarity(grads[True].double(), grads[False].double(), 0) > cosine
    assert resolve_config({"data": "phantom"}).channels_last  # on by default


def test_bf16_step_is_within_tolerance_of_fp32(tmp_path):
    """One Mean Teacher step (96x96 phantom, batch 2+2, dropout off, consistency active) on the same batch:
    under bf16 autocast every loss term is within 0.3 % of fp32 and the gradient points the same way (cosine
    > 0.995, largest deviation < 5 % of the largest component). Measured: loss 1.6e-4 relative, cosine 0.9993,
    largest deviation 1.5 % (1.8 % with channels-last)."""
    cfg = dict(TINY, method="mean_teacher", patch_size=(64, 64), unlabeled_batch=2, iterations=3000)
    terms, grads = {}, {}
    for prec in ("fp32", "bf16"):
        _, terms[prec], grads[prec] = _step_without_dropout(resolve_config(dict(cfg, precision=prec)),
                                                            tmp_path / prec, step=2000)
    assert terms["fp32"]["consistency_weight"] > 0 and terms["fp32"]["consistency"] > 0
    assert terms["bf16"]["loss"] != terms["fp32"]["loss"]  # bf16 did run: the comparison is not vacuous
    for k in terms["fp32"]:
        assert terms["bf16"][k] == pytest.approx(terms["fp32"][k], rel=3e-3), k
    a, b = grads["fp32"], grads["bf16"]
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.995
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_compile_keeps_checkpoint_keys_plain(tmp_path, monkeypatch):
    monkeypatch.setattr("semiseg.train.loop.check_compiler", lambda device: None)  # nothing is compiled here
    run_cfg = resolve_config(TINY)
    plain = Trainer(run_cfg, tmp_path / "a", load_run_data(run_cfg))
    plain.setup()
    run_cfg = resolve_config(dict(TINY, compile=True))
    comp = Trainer(run_cfg, tmp_path / "b", load_run_data(run_cfg))
    comp.setup()  # nn.Module.compile is lazy: nothing is compiled until the first forward
    assert comp.method.student._compiled_call_impl is not None
    keys = list(comp._model_payload(0, {})["model"])
    assert keys == list(plain._model_payload(0, {})["model"])
    assert not any("_orig_mod" in k for k in keys)


def test_compile_on_a_cpu_without_a_cpp_compiler_stops_with_one_line(tmp_path, monkeypatch):
    """Inductor looks for its C++ compiler by running it: a name that is not installed stands for a machine
    without one, and setup stops with a SemiSegError (one line on the CLI) before any training."""
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("semiseg-test-no-such-cxx",))
    run_cfg = resolve_config(dict(TINY, compile=True))
    trainer = Trainer(run_cfg, tmp_path, load_run_data(run_cfg))
    with pytest.raises(SemiSegError, match=r"--compile on the CPU needs a C\+\+ compiler"):
        trainer.setup()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_in_place_activations_same_values_and_gradients_fewer_saved_bytes(dtype):
    """The 2D UNet's in-place LeakyReLUs against a copy with them out of place, same weights, same dropout draws
    (fp32 and bf16 autocast): identical outputs and parameter gradients, and at most 90 % of the bytes kept
    for backward (two activation tensors fewer per block)."""
    import copy
    from torch import nn
    from semiseg.networks.unet2d import UNet2D
    torch.manual_seed(0)
    in_place = UNet2D(1, 4)
    out_of_place = copy.deepcopy(in_place)
    relus = [m for m in out_of_place.modules() if isinstance(m, nn.LeakyReLU)]
    assert relus and all(m.inplace for m in relus)
    for m in relus:
        m.inplace = False
    x = torch.randn(4, 1, 64, 64)

    def step(net):
        storages = {}

        def keep(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            y = net(x)
        y.float().square().mean().backward()
        return y, [p.grad for p in net.parameters()], sum(storages.values())

    y_a, g_a, bytes_a = step(in_place)
    y_b, g_b, bytes_b = step(out_of_place)
    assert torch.equal(y_a, y_b)
    assert all(torch.equal(a, b) for a, b in zip(g_a, g_b))
    assert bytes_a <= 0.9 * bytes_b


def test_compiled_network_runs_its_stages_compiled_with_eager_values():
    """A compiled UNet called the way UniMatch does (encode/decode on one batch, then the call on another,
    one backward for both) trains as the eager network does: same loss, gradients and BatchNorm running
    statistics up to rounding. With only the call compiled, the eager stages' BatchNorm saved running statistics
    that the compiled call then bumped, and backward raised "modified by an inplace operation". The backend is
    aot_eager: the version bump comes from AOT autograd's functionalised graph, which it runs, without the
    minutes inductor takes to generate code on two cores."""
    import copy
    from semiseg.networks import build_network
    torch.manual_seed(0)
    eager = build_network("unet", in_channels=1, num_classes=3, channels=(4, 8, 8, 8, 8), dropout=(0.0,) * 5)
    compiled = copy.deepcopy(eager)
    compiled.compile(backend="aot_eager")
    x1, x2 = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32)
    results = {}
    for name, net in (("eager", eager), ("compiled", compiled)):
        net.train()
        logits_1, _ = net.decode(net.encode(x1))
        loss = logits_1.square().mean() + net(x2).sin().mean()
        loss.backward()
        results[name] = (loss.detach(), [p.grad for p in net.parameters()],
                         [b.clone() for b in net.buffers() if b.is_floating_point()])
    (loss_e, grads_e, stats_e), (loss_c, grads_c, stats_c) = results["eager"], results["compiled"]
    assert compiled._compiled_stages and not eager._compiled_stages
    assert loss_c == pytest.approx(loss_e.item(), rel=1e-4)
    for g_e, g_c in zip(grads_e, grads_c):
        torch.testing.assert_close(g_c, g_e, rtol=1e-3, atol=1e-5)
    for s_e, s_c in zip(stats_e, stats_c):
        torch.testing.assert_close(s_c, s_e, rtol=1e-4, atol=1e-6)
