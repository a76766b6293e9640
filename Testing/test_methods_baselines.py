"""Mean Teacher and UA-MT losses recomputed by hand from their definitions (Mean Teacher: Tarvainen & Valpola 2017;
UA-MT: Yu et al. 2019, github.com/yulequan/UA-MT)."""
import copy
import math

import pytest
import torch

from semiseg.data.pipeline import Batch
from semiseg.losses import supervised_loss
from semiseg.methods import MethodContext, get_method
from semiseg.methods.ua_mt import masked_consistency, predictive_entropy, uncertainty_threshold
from semiseg.networks import build_network
from semiseg.schedules import sigmoid_rampup


def make(method, **opts):
    torch.manual_seed(0)
    net = build_network("unet", num_classes=4)
    cls = get_method(method)
    m = cls(net, cls.Options(**opts), MethodContext(dim=2, num_classes=4, iterations=30000, preset="acdc"))
    m.teacher = copy.deepcopy(net)
    return m


def batch():
    g = torch.Generator().manual_seed(1)
    return Batch(torch.randn(2, 1, 32, 32, generator=g), torch.randint(0, 4, (2, 32, 32), generator=g),
                 torch.randn(2, 1, 32, 32, generator=g))


def test_mean_teacher_loss_matches_definition():
    m = make("mean_teacher")
    b = batch()
    step = 4500  # after the 1000-iteration delay; weight = 0.1·rampup(4500 // 150 = 30, 200)
    torch.manual_seed(5)
    terms = m.losses(b, step)
    # recompute: same RNG draws (student dropout, then teacher noise, then teacher dropout)
    torch.manual_seed(5)
    logits = m.student(torch.cat([b.labeled_image, b.unlabeled_image]))
    sup = supervised_loss(logits[:2], b.labeled_label, "half_ce_dice")
    noise = torch.clamp(torch.randn_like(b.unlabeled_image) * 0.1, -0.2, 0.2)
    with torch.no_grad():
        t = torch.softmax(m.teacher(b.unlabeled_image + noise), 1)
    cons = ((torch.softmax(logits[2:], 1) - t) ** 2).mean()
    w = 0.1 * sigmoid_rampup(30, 200)
    assert terms["consistency_weight"].item() == pytest.approx(w)
    assert terms["loss"].item() == pytest.approx((sup + w * cons).item(), rel=1e-5)


def test_mean_teacher_consistency_is_off_before_the_delay():
    m = make("mean_teacher")
    terms = m.losses(batch(), 999)
    assert terms["consistency_weight"].item() == 0.0
    assert terms["loss"].item() == pytest.approx(terms["sup"].item())


def test_ua_mt_threshold_and_entropy():
    assert uncertainty_threshold(0, 6000) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * math.log(2))
    assert uncertainty_threshold(6000, 6000) == pytest.approx(math.log(2))
    # two MC samples of a 2-class, 1-pixel prediction: mean (0.7, 0.3)
    p = torch.tensor([[[0.6, 0.4]], [[0.8, 0.2]]]).reshape(2, 1, 2, 1)
    h = predictive_entropy(p)
    assert h.shape == (1, 1, 1)
    assert h.item() == pytest.approx(-(0.7 * math.log(0.7 + 1e-6) + 0.3 * math.log(0.3 + 1e-6)), rel=1e-6)


def test_ua_mt_masked_consistency_hand_computed():
    s = torch.tensor([0.9, 0.1, 0.5, 0.5]).reshape(1, 2, 2)  # (B=1, C=2, 2 pixels) channel-major
    s = torch.tensor([[0.9, 0.5], [0.1, 0.5]]).reshape(1, 2, 2)
    t = torch.tensor([[0.7, 0.0], [0.3, 1.0]]).reshape(1, 2, 2)
    mask = torch.tensor([1.0, 0.0]).reshape(1, 1, 2)
    # only pixel 0: (0.2² + 0.2²) / (2·1)
    assert masked_consistency(s, t, mask).item() == pytest.approx((0.04 + 0.04) / 2, rel=1e-6)


@pytest.mark.parametrize("per_pass,passes", [(0, [2, 8]), (2, [2, 4, 4]), (3, [2, 6, 2])])
def test_ua_mt_masks_uncertain_pixels_and_runs_t_passes(per_pass, passes):
    """One teacher pass for the target, then the T = 4 MC copies of the unlabeled batch (2 images): all in one
    forward by default, the code's T/2 passes of the doubled batch with mc_copies_per_pass 2."""
    m = make("ua_mt", mc_passes=4, mc_copies_per_pass=per_pass)
    calls = []
    m.teacher.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    terms = m.losses(batch(), 5000)
    assert calls == passes
    assert 0.0 <= terms["certain_fraction"].item() <= 1.0
    assert torch.isfinite(terms["loss"])


def test_ua_mt_one_mc_forward_equals_the_codes_passes_without_randomness():
    """With dropout off and no input noise every MC copy is the same computation: one forward of T copies gives
    the (T, B, C, H, W) samples of the code's T/2 forwards of the doubled batch, up to fp32 rounding (BatchNorm's
    batch statistics over identical copies do not depend on how many copies there are)."""
    probs = {}
    for per_pass in (0, 2):
        torch.manual_seed(0)
        net = build_network("unet", num_classes=4, dropout=(0, 0, 0, 0, 0))
        cls = get_method("ua_mt")
        m = cls(net, cls.Options(mc_copies_per_pass=per_pass, noise_std=0.0),
                MethodContext(dim=2, num_classes=4, iterations=30000, preset="acdc"))
        m.teacher = copy.deepcopy(net).train()
        probs[per_pass] = m.mc_probs(batch().unlabeled_image)
    assert probs[0].shape == (8, 2, 4, 32, 32)
    assert torch.allclose(probs[0], probs[2], atol=1e-5)
    assert torch.allclose(probs[0][0], probs[0][7], atol=1e-5)  # no randomness: the copies agree


class _NoiseProbe(torch.nn.Module):
    """A 'teacher' whose 2-class logits are (x, 0): its softmax samples reveal the input noise of each copy."""
    def forward(self, x):
        return torch.cat([x, torch.zeros_like(x)], 1)


def test_ua_mt_mc_copies_get_independent_noise_and_are_seeded():
    """Each of the T copies in the one MC forward gets its own clamp(N(0, 0.1²), ±0.2) input noise, with the same
    spread as in the code's passes, copies uncorrelated; the samples are reproducible with the seed."""
    u = torch.zeros(2, 1, 64, 64)
    noise = {}
    for per_pass in (0, 2):
        m = make("ua_mt", mc_copies_per_pass=per_pass)
        m.teacher = _NoiseProbe()
        torch.manual_seed(3)
        p = m.mc_probs(u)[:, :, 0]  # sigmoid(noise)
        torch.manual_seed(3)
        assert torch.equal(p, m.mc_probs(u)[:, :, 0])  # same seed, same samples
        noise[per_pass] = torch.logit(p.double()).reshape(8, -1)
    for n in noise.values():
        assert n.abs().max() <= 0.2 + 1e-6
        corr = torch.corrcoef(n)
        assert (corr - torch.eye(8, dtype=corr.dtype)).abs().max() < 0.06  # 8192 values per copy: |r| ~ 0.01
    assert noise[0].std().item() == pytest.approx(noise[2].std().item(), rel=0.03)


@pytest.mark.parametrize("method", ["mean_teacher", "ss_net", "lcc"])
def test_a_ramp_longer_than_the_run_is_capped_to_the_run(method):
    """ACDC's 30000-iteration ramp in a 3000-iteration run (a user's own data, a CPU budget) reaches the full
    weight at the run's end: λ(t) = c·sigmoid_rampup(t // 150, 3000 / 150), not c·sigmoid_rampup(t // 150, 200)."""
    cls = get_method(method)
    short = cls(build_network("unet", num_classes=4), cls.Options(), MethodContext(2, 4, 3000, "generic2d"))
    full = cls(build_network("unet", num_classes=4), cls.Options(), MethodContext(2, 4, 30000, "acdc"))
    assert short.ramp_length(30000) == 3000 and full.ramp_length(30000) == 30000
    assert short.weight(3000) == pytest.approx(0.1)
    assert short.weight(1500) == pytest.approx(0.1 * sigmoid_rampup(10, 20))
    assert full.weight(3000) == pytest.approx(0.1 * sigmoid_rampup(20, 200))  # exp(-5·0.9²) ≈ 0.017 of full
