"""SS-Net (Wu et al., MICCAI 2022, github.com/ycwu1997/SS-Net) and LCC (Gao & Yu, ISBP 2023): VAT, the feature
memory, the separation loss, the low-confidence
mask, the recipes, and short phantom runs against the supervised baseline."""
import copy
import math
import tempfile

import pytest
import torch
from torch import nn

from semiseg.checkpoint import load_checkpoint
from semiseg.config import resolve_config
from semiseg.data.datasets import load_phantom
from semiseg.data.pipeline import Batch
from semiseg.methods import MethodContext, get_method
from semiseg.methods.parts.confidence import confidence_mask, entropy_mask, low_confidence_consistency
from semiseg.methods.parts.prototypes import (PrototypeSeparation, SeparationOptions,
                                              memory_candidates, separation_loss)
from semiseg.methods.parts.vat import (adversarial_direction, binary_dice_distance, frozen_bn_stats,
                                       l2_normalize_per_sample, soft_dice_distance, vat_loss)
from semiseg.methods.ss_net import ssnet_supervised_loss
from semiseg.networks import build_network
from semiseg.schedules import sigmoid_rampup
from semiseg.train.loop import Trainer

from phantom_comparison import assert_beats_matched_baseline


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: the CI machine is shared; restore the setting for the other test files."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def tiny_net(dim, out):
    conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dim == 2 else (nn.Conv3d, nn.BatchNorm3d)
    return nn.Sequential(conv(1, 8, 3, padding=1), bn(8), nn.ReLU(), conv(8, out, 3, padding=1))


# ------------------------------------------------------------------------------------------ VAT
@pytest.mark.parametrize("dim,classes,distance,eps", [(2, 3, soft_dice_distance, 6.0), (3, 2, binary_dice_distance, 10.0)])
def test_vat_direction_beats_random_directions_of_the_same_norm(dim, classes, distance, eps):
    torch.manual_seed(0)
    net = tiny_net(dim, classes).train()
    x = torch.randn((2, 1) + (12,) * dim)
    with torch.no_grad():
        target = torch.softmax(net(x), 1)
    d = adversarial_direction(net, x, target, distance, xi=10.0)
    assert torch.allclose(d.flatten(1).norm(dim=1), torch.ones(2), atol=1e-5)  # unit norm per sample
    with torch.no_grad(), frozen_bn_stats(net):
        adv = distance(torch.softmax(net(x + eps * d), 1), target).item()
        rand = [distance(torch.softmax(net(x + eps * l2_normalize_per_sample(torch.rand_like(x) - 0.5)), 1),
                         target).item() for _ in range(32)]
    assert adv > sum(rand) / len(rand)
    assert adv > max(rand)


def test_vat_passes_leave_bn_running_statistics_unchanged():
    torch.manual_seed(0)
    net = build_network("unet", num_classes=4, upsampling="bilinear").train()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        net(x)  # non-trivial statistics
    target = torch.softmax(net(x), 1).detach()
    before = bn_buffers(net)
    loss = vat_loss(net, x, soft_dice_distance, xi=10.0, eps=6.0, target=target)
    after = bn_buffers(net)
    assert before.keys() == after.keys() and len(before) > 10
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(m.track_running_stats for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert all(p.grad is None for p in net.parameters())  # the power iteration accumulates no parameter gradient
    loss.backward()
    assert net.out_conv.weight.grad is not None and net.out_conv.weight.grad.abs().sum() > 0
    # with freeze_target_bn the whole VAT call is stats-neutral
    vat_loss(net, x, soft_dice_distance, freeze_target_bn=True)
    for k, v in bn_buffers(net).items():
        assert torch.equal(before[k], v), k


def test_vat_target_pass_updates_bn_like_one_plain_forward():
    """Code default: the target is a plain train-mode forward; the perturbed passes add nothing."""
    torch.manual_seed(0)
    net = build_network("unet", num_classes=4, upsampling="bilinear").train()
    ref = copy.deepcopy(net)
    x = torch.randn(2, 1, 32, 32)
    torch.manual_seed(3)
    vat_loss(net, x, soft_dice_distance)
    torch.manual_seed(3)  # same dropout draws for the first (target) pass
    with torch.no_grad():
        ref(x)
    a, b = bn_buffers(net), bn_buffers(ref)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------ memory
class Score(nn.Module):
    """A known selector: score logit = the first feature."""

    def forward(self, f):
        return f[:, :1]


def hand_separation(select="lowest", when_empty="keep", per_class=2):
    opts = SeparationOptions(feat_dim=2, memory_per_class=per_class, memory_select=select, memory_when_empty=when_empty)
    sep = PrototypeSeparation(3, 2, opts)
    sep.heads.projection = nn.Identity()  # memory features = embedding rows, to check the rule by hand
    sep.heads.selectors = nn.ModuleList([Score(), Score(), Score()])
    return sep


# six pixels in one row: (label, prediction, feature)
PIXELS = [(0, 0, (9.0, 9.0)),    # correct background: never stored
          (1, 1, (0.5, 1.0)),    # correct class 1
          (1, 2, (5.0, 5.0)),    # wrong prediction: never stored
          (1, 1, (-1.0, 2.0)),   # correct class 1, lowest score
          (1, 1, (2.0, 3.0)),    # correct class 1, highest score
          (2, 2, (0.0, 4.0))]    # correct class 2


def pixel_tensors(pixels):
    label = torch.tensor([[[p[0] for p in pixels]]])          # (1, 1, 6)
    pred = torch.tensor([[[p[1] for p in pixels]]])
    emb = torch.tensor([p[2] for p in pixels]).T.reshape(1, 2, 1, len(pixels))  # (B, E, 1, 6)
    return emb, pred, label


def test_memory_candidates_are_correct_foreground_only():
    emb, pred, label = pixel_tensors(PIXELS)
    assert memory_candidates(pred, label).reshape(-1).tolist() == [False, True, False, True, True, True]


@pytest.mark.parametrize("select,expected", [("lowest", [(-1.0, 2.0), (0.5, 1.0)]), ("highest", [(2.0, 3.0), (0.5, 1.0)])])
def test_memory_update_rule_on_a_hand_built_example(select, expected):
    sep = hand_separation(select)
    emb, pred, label = pixel_tensors(PIXELS)
    assert sep.update_memory(emb, pred, label) == 4
    mem = sep.memory.memory
    assert mem[0] is None  # background never stored
    assert mem[1].tolist() == [list(e) for e in expected]  # cap 2 of 3, in the selector's sort order
    assert mem[2].tolist() == [[0.0, 4.0]]  # under the cap: kept as is
    # next step without class-2 candidates: the code keeps the old class-2 memory; "clear" empties it
    emb2, pred2, label2 = pixel_tensors(PIXELS[:5])
    sep.update_memory(emb2, pred2, label2)
    assert sep.memory.memory[2].tolist() == [[0.0, 4.0]]
    clear = hand_separation(select, when_empty="clear")
    clear.update_memory(emb, pred, label)
    clear.update_memory(emb2, pred2, label2)
    assert clear.memory.memory[2] is None and clear.memory.memory[1] is not None
    # all-background prediction: nothing stored at all
    fresh = hand_separation(select)
    fresh.update_memory(emb, torch.zeros_like(pred), torch.zeros_like(label))
    assert fresh.memory.memory == [None, None, None]


def test_memory_uses_projection_head_in_eval_mode_and_survives_state_dict():
    torch.manual_seed(0)
    opts = SeparationOptions(memory_per_class=1000)
    sep = PrototypeSeparation(3, 16, opts).train()
    with torch.no_grad():
        sep.heads.projection(torch.randn(64, 16) * 3 + 1)  # running statistics differ from batch statistics
    emb = torch.randn(1, 16, 4, 4)
    label = torch.randint(0, 3, (1, 4, 4))
    sep.update_memory(emb, label, label)
    rows = emb.movedim(1, -1).reshape(-1, 16)[label.reshape(-1) == 2]
    expected = copy.deepcopy(sep.heads.projection).eval()(rows)
    assert torch.allclose(sep.memory.memory[2], expected, atol=1e-6)
    assert sep.heads.projection.training  # restored
    other = PrototypeSeparation(3, 16, opts)
    other.load_state_dict(sep.state_dict())
    assert other.memory.memory[0] is None and torch.equal(other.memory.memory[2], sep.memory.memory[2])


# ---------------------------------------------------------------------------- separation loss
class Linear1(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, f):
        return (self.a * f[:, 0] + self.b * f[:, 1])[:, None]


@pytest.mark.parametrize("memory_weights", ["code", "rescaled"])
def test_separation_loss_equals_hand_computation_on_three_pixels(memory_weights):
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    labels = torch.tensor([1, 1, 2])  # class 2 has a single pixel: skipped (the code needs two)
    memory = [None, torch.tensor([[2.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [0.0, 3.0]])]
    sel = [None, Linear1(1.0, -1.0), Linear1(1.0, 0.0)]      # logits: f0 → 1, f1 → -1
    sel_mem = [None, Linear1(0.0, 2.0), Linear1(0.0, 0.0)]   # memory logits on normalised m: 0 and √2
    loss = separation_loss(feats, labels, memory, sel, sel_mem, memory_weights)
    s = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    w = [2 * s(1) / (s(1) + s(-1)), 2 * s(-1) / (s(1) + s(-1))]
    if memory_weights == "code":
        v = [1.0, 1.0]
    else:
        v = [2 * s(0) / (s(0) + s(math.sqrt(2))), 2 * s(math.sqrt(2)) / (s(0) + s(math.sqrt(2)))]
    r = 1 / math.sqrt(2)
    dist = [[1 - 1, 1 - r],   # f0 = (1,0) vs m̂ = (1,0), (r,r)
            [1 - 0, 1 - r]]   # f1 = (0,1)
    loss_1 = sum(w[i] * v[j] * dist[i][j] for i in range(2) for j in range(2)) / 4
    assert loss.item() == pytest.approx(loss_1 / 3, rel=1e-6)  # / C = 3 classes, background included
    # the selectors see detached features: the feature gradient is that of the distances alone
    loss.backward()
    g = torch.zeros(3, 2)
    for i, f in enumerate(([1.0, 0.0], [0.0, 1.0])):
        fi = torch.tensor(f, requires_grad=True)
        mh = torch.nn.functional.normalize(memory[1], dim=1)
        li = sum(w[i] * v[j] * (1 - torch.dot(fi / fi.norm(), mh[j])) for j in range(2)) / 4 / 3
        li.backward()
        g[i] = fi.grad
    assert torch.allclose(feats.grad, g, atol=1e-6)


# --------------------------------------------------------------------------- confidence masks
def test_confidence_and_entropy_masks():
    p = torch.tensor([[0.75, 0.25], [0.9, 0.1], [0.5, 0.5]]).T.reshape(1, 2, 3)
    assert confidence_mask(p, 0.75).reshape(-1).tolist() == [0.0, 0.0, 1.0]  # at τ: excluded
    h = lambda a: -(a * math.log(a + 1e-6) + (1 - a) * math.log(1 - a + 1e-6))  # noqa: E731
    assert entropy_mask(p, h(0.75) - 1e-6).reshape(-1).tolist() == [1.0, 0.0, 1.0]
    s = torch.tensor([[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]]).T.reshape(1, 2, 3)
    # only pixel 2 counts: (0.4² + 0.4²) / (C·1)
    assert low_confidence_consistency(s, p, confidence_mask(p, 0.75)).item() == pytest.approx(0.32 / 2, rel=1e-6)


def make_method(name, preset="acdc", dim=2, classes=4, **opts):
    torch.manual_seed(0)
    net = build_network("unet", num_classes=classes, upsampling="bilinear") if dim == 2 else \
        build_network("vnet", num_classes=classes)
    cls = get_method(name)
    o = cls.default_options(preset, dim)
    for k, v in opts.items():
        setattr(o, k, v)
    m = cls(net, o, MethodContext(dim=dim, num_classes=classes, iterations=30000, preset=preset))
    if cls.uses_teacher:
        m.teacher = copy.deepcopy(net)
    return m


@pytest.mark.parametrize("sep_pixels", ["low_conf", "all", "high_conf"])
def test_high_confidence_pixels_get_exactly_zero_gradient(sep_pixels):
    m = make_method("lcc", classes=3, tau=0.75, sep_pixels=sep_pixels).train()
    g = torch.Generator().manual_seed(0)
    m.separation.memory.memory = [None, torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g)]
    # teacher: 16 pixels, cycling max probability 0.5 (low), 0.75 (= τ: high), 0.9 (high), classes cycling 1, 2
    conf = torch.tensor([0.5, 0.75, 0.9, 0.5] * 4)
    cls = torch.tensor([1, 1, 2, 2, 2, 1, 1, 2] * 2)
    tp = torch.full((16, 3), 0.0)
    tp[torch.arange(16), cls] = conf
    tp[torch.arange(16), (cls % 2) + 1] = (1 - conf) * 0.6
    tp[:, 0] = 1 - tp.sum(1)
    teacher = tp.T.reshape(1, 3, 4, 4)
    low = (conf < 0.75).reshape(4, 4)
    logits = torch.randn(1, 3, 4, 4, generator=g, requires_grad=True)
    emb = torch.randn(1, 16, 4, 4, generator=g, requires_grad=True)
    terms = m.unlabeled_terms(logits, emb, teacher, step=100)
    assert terms["low_conf_fraction"].item() == pytest.approx(0.5)
    terms["consistency"].backward(retain_graph=True)
    assert torch.all(logits.grad[0][:, ~low] == 0)
    assert logits.grad[0][:, low].abs().sum() > 0
    terms["sep_u"].backward()
    eg = emb.grad[0].abs().sum(0)
    if sep_pixels == "low_conf":
        assert torch.all(eg[~low] == 0) and eg[low].sum() > 0
    elif sep_pixels == "high_conf":
        assert torch.all(eg[low] == 0) and eg[~low].sum() > 0
    else:
        assert torch.all(eg > 0)


# ------------------------------------------------------------------------ losses and recipes
def test_ssnet_supervised_dice_forms():
    logits = torch.tensor([[[0.0, 2.0, -1.0]], [[1.0, 0.0, 1.0]]]).reshape(1, 2, 1, 3)  # (B, C, 1, 3)
    label = torch.tensor([[[1, 0, 0]]])
    p1 = torch.softmax(logits, 1)[0, 1, 0].tolist()
    y = [1.0, 0.0, 0.0]  # foreground indicator of the label
    binary = 1 - (2 * sum(a * b for a, b in zip(p1, y)) + 1e-8) / (sum(p1) + sum(y) + 1e-8)
    assert ssnet_supervised_loss(logits, label, "dice", "auto", 3).item() == pytest.approx(binary, rel=1e-6)
    p0 = [1 - a for a in p1]
    y0 = [1 - a for a in y]
    multi = sum(1 - 2 * sum(a * b for a, b in zip(p, t)) / (sum(a * a for a in p) + sum(t))
                for p, t in ((p0, y0), (p1, y))) / 2
    assert ssnet_supervised_loss(logits, label, "dice", "auto", 2).item() == pytest.approx(multi, rel=1e-6)


def two_stream(dim=2, size=32, classes=4):
    g = torch.Generator().manual_seed(1)
    s = (size,) * dim
    return Batch(torch.randn(2, 1, *s, generator=g), torch.randint(0, classes, (2, *s), generator=g),
                 torch.randn(2, 1, *s, generator=g))


def test_ss_net_acdc_total_loss_and_weight():
    m = make_method("ss_net").train()
    step = 4500
    terms = m.losses(two_stream(), step)
    w = 0.1 * sigmoid_rampup(4500 // 150, 200)
    assert terms["consistency_weight"].item() == pytest.approx(w)
    expect = terms["sup"] + w * (terms["lds"] + 0.1 * (terms["sep_l"] + terms["sep_u"]))
    assert terms["loss"].item() == pytest.approx(expect.item(), rel=1e-5)
    assert terms["sep_l"].item() > 0 and terms["sep_u"].item() > 0 and terms["lds"].item() > 0


def ss_net_without_dropout(**options):
    """SS-Net's ACDC method on a dropout-free bilinear UNet with the same initial weights (seed 0), in train
    mode, with ``options`` changed from its ACDC defaults."""
    torch.manual_seed(0)
    net = build_network("unet", num_classes=4, upsampling="bilinear", dropout=(0, 0, 0, 0, 0))
    cls = get_method("ss_net")
    o = cls.default_options("acdc", 2)
    for name, value in options.items():
        setattr(o, name, value)
    return cls(net, o, MethodContext(dim=2, num_classes=4, iterations=30000, preset="acdc")).train()


def test_vat_grad_early_gives_the_same_loss_and_gradients():
    """The memory-saving carrier (VAT graph consumed before the main forward) changes no number."""
    b = two_stream()
    grads, values = [], []
    for early in (False, True):
        m = ss_net_without_dropout(vat_grad_early=early)
        torch.manual_seed(5)  # without dropout the only random draw is the VAT start direction
        terms = m.losses(b, 20000)
        terms["loss"].backward()
        values.append({k: v.item() for k, v in terms.items()})
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    assert values[0] == pytest.approx(values[1], rel=1e-6)
    assert grads[0].keys() == grads[1].keys()
    scale = max(g.abs().max().item() for g in grads[0].values())
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6 * scale), k


def test_vat_target_reuse_saves_one_forward_and_changes_no_number_without_dropout():
    """The VAT target taken from the main forward (default) instead of a second train-mode forward of the same
    batch (the code): without dropout both targets are the same softmax, so loss terms and gradients agree;
    the student runs one forward fewer, and BatchNorm's running statistics are updated once instead of twice."""
    b = two_stream()
    grads, values, forwards, tracked = [], [], [], []
    for reuse in (False, True):
        m = ss_net_without_dropout(vat_reuse_target=reuse)
        net = m.student
        calls = []
        net.register_forward_hook(lambda mod, inp, out: calls.append(1))
        torch.manual_seed(5)  # without dropout the only random draw is the VAT start direction
        terms = m.losses(b, 20000)
        terms["loss"].backward()
        values.append({k: v.item() for k, v in terms.items()})
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
        forwards.append(len(calls))
        tracked.append(next(v.item() for k, v in net.state_dict().items() if k.endswith("num_batches_tracked")))
    assert forwards == [4, 3]  # main, target, power iteration, perturbed -> main, power iteration, perturbed
    assert tracked == [2, 1]
    assert values[0] == pytest.approx(values[1], rel=1e-6)
    scale = max(g.abs().max().item() for g in grads[0].values())
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6 * scale), k


def test_ss_net_la_step_on_a_small_vnet_patch():
    m = make_method("ss_net", preset="la", dim=3, classes=2, sep_max_pixels=500).train()
    assert (m.options.vat_eps, m.options.consistency, m.options.rampup_iterations) == (10.0, 1.0, 6000)
    terms = m.losses(two_stream(3, 16, 2), 3000)
    assert terms["consistency_weight"].item() == pytest.approx(sigmoid_rampup(20, 40))
    terms["loss"].backward()
    assert m.separation.heads.projection[0].weight.grad is not None
    assert m.student.out_conv.weight.grad.abs().sum() > 0


def test_presets_give_the_recipes():
    a = resolve_config({"method": "ss_net", "data": "acdc:/nowhere", "preset": "acdc"})
    assert (a.upsampling, a.lr_schedule, a.iterations, a.labeled_batch, a.unlabeled_batch) == ("bilinear", "constant", 30000, 12, 12)
    assert a.method_options["sup_loss"] == "dice" and a.method_options["vat_eps"] == 6.0
    assert a.method_options["rampup_iterations"] == 30000 and a.method_options["consistency"] == 0.1
    la = resolve_config({"method": "ss_net", "data": "la:/nowhere", "preset": "la"})
    assert (la.lr_schedule, la.labeled_batch, la.unlabeled_batch, la.network) == ("step", 2, 2, "vnet")
    assert (la.method_options["vat_eps"], la.method_options["consistency"], la.method_options["rampup_iterations"]) == (10.0, 1.0, 6000)
    c = resolve_config({"method": "lcc", "data": "la:/nowhere", "preset": "la", "method_options": {"tau": 0.95}})
    assert c.method_options["tau"] == 0.95 and c.method_options["sep_pixels"] == "low_conf"
    assert "RECONSTRUCTED" in get_method("lcc").description


# ---------------------------------------------------------------------- phantom vs supervised
PHANTOM = {"data": "phantom:6", "labeled": 1, "patch_size": (32, 32), "labeled_batch": 2, "unlabeled_batch": 2,
           "iterations": 60, "val_every": 60, "log_every": 30, "checkpoint_every": 1000, "upsampling": "bilinear",
           "deterministic": True, "device": "cpu", "threads": 1}


@pytest.fixture(scope="module")
def phantom_data():
    return load_phantom(6, 1, n_val=2, n_test=0)  # generated once, shared by the runs


def phantom_run(method, data, **overrides):
    with tempfile.TemporaryDirectory() as d:
        summary = Trainer(resolve_config(dict(PHANTOM, method=method, **overrides)), d, data=data).run()
        model_keys = set(load_checkpoint(f"{d}/best.pt")["model"])
    return summary["best_val_dice"], model_keys


@pytest.mark.parametrize("method", ["ss_net", "lcc"])
def test_phantom_training_saves_the_plain_network(method, phantom_data):
    dice, keys = phantom_run(method, phantom_data, iterations=20, val_every=20)
    assert 0.0 <= dice <= 1.0
    plain = set(build_network("unet", num_classes=4, upsampling="bilinear").state_dict())
    assert keys == plain  # best.pt holds the plain network, no heads, memory or teacher


# Checks (slow): on the CT phantom (4 labeled + 16 unlabeled, planned, 2D axial slices at 48x48), after 3200
# iterations, the method's best validation Dice is above its matched supervised baseline's (same network,
# schedule and Dice-only loss, Testing/phantom_comparison.py) on each of the seeds 1337, 1 and 2, and by more than
# one point on average. ss_net is run with consistency 1.0, its LA weight.
CT_PHANTOM = {"data": "phantom_ct:20", "labeled": 4, "dim": 2, "patch_size": (48, 48)}


@pytest.mark.slow
@pytest.mark.parametrize("method,options", [("ss_net", {"consistency": 1.0}), ("lcc", {})])
def test_method_beats_its_matched_supervised_baseline(method, options):
    assert_beats_matched_baseline(method, iterations=3200, method_options=options, **CT_PHANTOM)
