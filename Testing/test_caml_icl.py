"""CAML (Gao et al., MICCAI 2023, github.com/Herschel555/CAML) and ICL (Zhu et al., MIDL 2023,
github.com/zhuye98/ICL): CMA, the memory bank and omni-correlation consistency, sharpening and
mutual consistency, the ICL modules' exact reshapes, sizes and losses, checked against definitions and
hand computations; phantom training against the supervised baseline (slow)."""
import math
import platform
from types import SimpleNamespace

import pytest
import torch

from semiseg.checkpoint import load_checkpoint
from semiseg.config import resolve_config
from semiseg.run import load_run_data
from semiseg.data.pipeline import Batch
from semiseg.errors import SemiSegError
from semiseg.losses import supervised_loss
from semiseg.methods import MethodContext, get_method
from semiseg.methods import icl as icl_mod
from semiseg.methods.caml import rampup_for_labels
from semiseg.methods.icl import aux_loss, map_consistency, pseudo_soft_loss, soft_dice
from semiseg.methods.parts.cma import CrossSampleMutualAttention, build_auxiliary_branch
from semiseg.methods.parts.correlation import LabeledFeatureMemory, correlation_matrix, omni_correlation_loss
from semiseg.methods.parts.icl_modules import (ClassDecoder, ClassQueryAttention, SemanticProxyModule,
                                               token_counts_for)
from semiseg.methods.parts.sharpen import mutual_consistency, sharpen
from semiseg.networks import build_network, count_parameters
from semiseg.schedules import sigmoid_rampup
from semiseg.train.loop import Trainer

from phantom_comparison import assert_beats_matched_baseline


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread is faster and steadier on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------ CMA
@pytest.mark.parametrize("family", ["vnet", "unet"])
def test_cma_is_the_identity_in_eval_mode(family):
    torch.manual_seed(0)
    if family == "vnet":
        student = build_network("vnet", num_classes=2, n_filters=4)
        up, x = "trilinear", torch.randn(2, 1, 16, 16, 16)
    else:
        student = build_network("unet", num_classes=4)
        up, x = "bilinear", torch.randn(2, 1, 32, 32)
    aux = build_auxiliary_branch(student, up)
    cfg = {k: v for k, v in student.config.items() if k != "name"}
    plain = build_network(family, **dict(cfg, upsampling=up))
    missing, unexpected = plain.load_state_dict(aux.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("encoder.3.") for k in unexpected)
    aux.eval(), plain.eval()
    with torch.no_grad():
        for a, b in zip(aux.encode(x), plain.encode(x)):
            assert torch.equal(a, b)
        assert torch.equal(aux(x), plain(x))
    # train mode: CMA really acts (BN in eval on both, CMA without dropout randomness)
    aux.train(), plain.train()
    for net in (aux, plain):
        for m in net.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.Dropout, torch.nn.Dropout3d)):
                m.eval()
    with torch.no_grad():
        assert not torch.allclose(aux.encode(x)[3], plain.encode(x)[3])


def test_cma_attends_across_the_batch_in_train_mode():
    torch.manual_seed(0)
    x = torch.randn(3, 32, 2, 2, 2)
    x2 = x.clone()
    x2[1] += 1.0  # change sample 1 only
    cma = CrossSampleMutualAttention(32, dropout=0.0).train()
    with torch.no_grad():
        assert not torch.allclose(cma(x)[0], cma(x2)[0], atol=1e-5)  # sample 0 sees sample 1
    intra_only = CrossSampleMutualAttention(32, dropout=0.0, inter=False).train()
    with torch.no_grad():
        assert torch.allclose(intra_only(x)[0], intra_only(x2)[0], atol=1e-6)  # no cross-sample path
    # inside the auxiliary V-Net encoder: BN in eval (no batch statistics), CMA in train mode
    student = build_network("vnet", num_classes=2, n_filters=4)
    aux = build_auxiliary_branch(student, "trilinear", dropout=0.0)
    aux.eval()
    aux.encoder[3][-1].train()
    v = torch.randn(2, 1, 16, 16, 16)
    v2 = v.clone()
    v2[1] = torch.randn(1, 16, 16, 16)
    with torch.no_grad():
        f, g = aux.encode(v), aux.encode(v2)
    assert torch.equal(f[2][0], g[2][0])              # before CMA: sample 0 untouched
    assert not torch.allclose(f[3][0], g[3][0], atol=1e-5)  # after CMA: sample 0 depends on sample 1


# ------------------------------------------------------------------------------------------------ OCC
def test_correlation_rows_sum_to_one_and_skip_rules():
    torch.manual_seed(0)
    g = torch.randn(50, 8)
    label = torch.randint(0, 3, (50,))
    label[0] = 2
    label[1:] = torch.where(label[1:] == 2, torch.zeros_like(label[1:]), label[1:])  # class 2: one voxel
    conf = torch.rand(50)
    memory = [torch.randn(5, 8), None, torch.randn(4, 8)]
    corr = correlation_matrix(g, conf, label, memory, 3, 0.1, num_filtered=7)
    n0, n1 = int((label == 0).sum()), int((label == 1).sum())
    # rows: min(7, n) per class with more than one voxel (class 2 has one: skipped); columns: 5 + 4
    assert corr.shape == (min(7, n0) + min(7, n1), 9)
    assert torch.allclose(corr.sum(1), torch.ones(corr.shape[0]), atol=1e-6)
    assert correlation_matrix(g, conf, label, [None, None, torch.randn(1, 8)], 3) is None


def test_occ_loss_equals_hand_computation_on_a_tiny_memory():
    memory = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [2.0, 0.0]])]
    label = torch.tensor([0, 0, 1, 1])
    conf = torch.tensor([0.9, 0.8, 0.7, 0.95])
    g_v = torch.tensor([[0.1, 0.2], [5.0, 5.0], [0.3, -0.1], [0.2, 0.1]])
    g_a = torch.tensor([[0.2, 0.0], [-5.0, 5.0], [0.0, 0.0], [0.1, 0.3]])
    # num_filtered = 1: class 0 keeps voxel 0 (0.9 > 0.8), class 1 keeps voxel 3 (0.95 > 0.7)
    cv = correlation_matrix(g_v, conf, label, memory, 2, 0.1, num_filtered=1)
    ca = correlation_matrix(g_a, conf, label, memory, 2, 0.1, num_filtered=1)
    bank = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]]

    def softmax_row(v):
        logits = [(v[0] * m[0] + v[1] * m[1]) / 0.1 for m in bank]
        e = [math.exp(z - max(logits)) for z in logits]
        return [z / sum(e) for z in e]

    rows_v = [softmax_row([0.1, 0.2]), softmax_row([0.2, 0.1])]
    rows_a = [softmax_row([0.2, 0.0]), softmax_row([0.1, 0.3])]
    hand = sum(-a * math.log(v + 1e-8) for ra, rv in zip(rows_a, rows_v) for a, v in zip(ra, rv)) / 2
    assert torch.allclose(cv, torch.tensor(rows_v), atol=1e-6)
    assert omni_correlation_loss(ca, cv).item() == pytest.approx(hand, rel=1e-6)
    # neither side is a stop-gradient target
    ga = g_a.clone().requires_grad_(True)
    gv = g_v.clone().requires_grad_(True)
    omni_correlation_loss(correlation_matrix(ga, conf, label, memory, 2, 0.1, 1),
                          correlation_matrix(gv, conf, label, memory, 2, 0.1, 1)).backward()
    assert ga.grad.abs().sum() > 0 and gv.grad.abs().sum() > 0


def make_caml(dim=2, **opts):
    torch.manual_seed(0)
    cls = get_method("caml")
    net = build_network("unet", num_classes=4) if dim == 2 else build_network("vnet", num_classes=2, n_filters=4)
    return cls(net, cls.Options(**opts), MethodContext(dim, 4 if dim == 2 else 2, 1000, "phantom"))


@pytest.mark.parametrize("rows", ["per_voxel", "as_coded"])
def test_memory_holds_only_voxels_both_branches_predict_correctly(rows):
    """Branch A's memory rows: per_voxel = the 16 channels of a voxel; as_coded = the reference's view(-1, 16)
    of the channel-first tensor: row k = 16 consecutive values of the flattened (C, *S) tensor."""
    m = make_caml(2, memory_rows=rows)
    # one labeled 1x4 image; classes predicted by V: 0 1 1 0, by A: 0 1 0 0, truth: 0 1 1 1
    y = torch.tensor([[[0, 1, 1, 1]]])
    pv = torch.nn.functional.one_hot(torch.tensor([[[0, 1, 1, 0]]]), 4).movedim(-1, 1).float()
    pa = torch.nn.functional.one_hot(torch.tensor([[[0, 1, 0, 0]]]), 4).movedim(-1, 1).float()
    ev = torch.arange(64, dtype=torch.float32).reshape(1, 16, 1, 4) / 10
    ea = -torch.arange(64, dtype=torch.float32).reshape(1, 16, 1, 4) / 20
    for h in (m.proj_v, m.proj_a):  # non-trivial BN running statistics
        h[1].running_mean.uniform_(-1, 1)
        h[1].running_var.uniform_(0.5, 2)
    before = m.proj_v[1].running_mean.clone()
    correct = m.update_memory(ev, ea, pv, pa, y, [7])
    assert correct.tolist() == [[[True, True, False, False]]]
    assert m.proj_v.training and m.proj_a.training               # heads back in train mode
    assert torch.equal(m.proj_v[1].running_mean, before)          # eval-mode heads: statistics untouched
    entry = m.memory.entries[7]
    assert [e.shape[0] for e in entry] == [1, 1, 0, 0]           # pixel 0 (class 0) and pixel 1 (class 1)

    def eval_head(head, x):  # Linear -> BN with running statistics -> ReLU -> Linear, by hand
        lin, bn, _, out = head
        z = lin(x)
        z = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        return out(torch.relu(z))

    with torch.no_grad():
        for cls_, px in ((0, 0), (1, 1)):
            a_row = ea[0, :, 0, px] if rows == "per_voxel" else ea.flatten()[16 * px:16 * px + 16]
            want = (eval_head(m.proj_v, ev[0, :, 0, px][None]) + eval_head(m.proj_a, a_row[None])) / 2
            assert torch.allclose(entry[cls_], want, atol=1e-5)
    # the entry of a sample is overwritten when it reappears; sampling needs enough stored features
    m.update_memory(ev, ea, pv, pv, y, [7])
    assert [e.shape[0] for e in m.memory.entries[7]] == [1, 2, 0, 0]
    sampled = m.memory.sample(2)
    assert sampled[0] is None and sampled[1].shape == (2, 32) and sampled[2] is None


def test_memory_sampling_is_without_replacement_over_all_entries():
    mem = LabeledFeatureMemory(2)
    mem.update([torch.arange(6.0).reshape(3, 2), torch.arange(6.0, 10.0).reshape(2, 2)],
               [torch.tensor([1, 1, 0]), torch.tensor([1, 1])], [0, 3])
    torch.manual_seed(0)
    s = mem.sample(4)
    assert s[0] is None  # one class-0 feature stored < 4
    rows = sorted(tuple(r) for r in s[1].tolist())
    assert len(set(rows)) == 4 and set(rows) == {(0.0, 1.0), (2.0, 3.0), (6.0, 7.0), (8.0, 9.0)}
    state = mem.get_extra_state()
    other = LabeledFeatureMemory(2)
    other.set_extra_state(state)
    assert torch.equal(other.entries[3][1], mem.entries[3][1])


# ------------------------------------------------------------------------------------- sharpening, MC
def test_sharpening_matches_its_formula_at_t_0_1():
    p = torch.tensor([0.0, 0.2, 0.5, 0.7, 0.95, 1.0], dtype=torch.float64)
    want = [q ** 10 / (q ** 10 + (1 - q) ** 10) for q in p.tolist()]
    assert torch.allclose(sharpen(p, 0.1), torch.tensor(want, dtype=torch.float64), atol=1e-12)
    assert sharpen(torch.tensor([0.7]), 0.1).item() == pytest.approx(0.7 ** 10 / (0.7 ** 10 + 0.3 ** 10), rel=1e-6)


def test_mutual_consistency_is_symmetric_and_matches_definition():
    torch.manual_seed(0)
    pv = torch.softmax(torch.randn(2, 2, 3, 3), 1).requires_grad_(True)
    pa = torch.softmax(torch.randn(2, 2, 3, 3), 1).requires_grad_(True)
    t = 0.1
    hand = (((pv - pa ** 10 / (pa ** 10 + (1 - pa) ** 10)) ** 2).sum() / pv.numel()
            + ((pa - pv ** 10 / (pv ** 10 + (1 - pv) ** 10)) ** 2).sum() / pa.numel())
    a, b = mutual_consistency(pv, pa, t), mutual_consistency(pa, pv, t)
    assert a.item() == pytest.approx(b.item(), rel=1e-7)
    assert a.item() == pytest.approx(hand.item(), rel=1e-6)
    a.backward()
    assert pv.grad.abs().sum() > 0 and pa.grad.abs().sum() > 0  # neither side detached


def test_caml_total_loss_weights_and_label_count_ramp():
    m = make_caml(2, rampup_iterations=3000, memory_per_class=4)
    g = torch.Generator().manual_seed(1)
    b = Batch(torch.randn(2, 1, 32, 32, generator=g), torch.randint(0, 4, (2, 32, 32), generator=g),
              torch.randn(2, 1, 32, 32, generator=g), torch.tensor([0, 1]))
    step = 1499  # the reference computes the ramp after iter_num += 1: (1499 + 1) // 150 = 10
    terms = m.losses(b, step)
    r = sigmoid_rampup(10, 20)
    assert terms["lambda_c"].item() == pytest.approx(1.0 * r) and terms["lambda_o"].item() == pytest.approx(0.05 * r)
    assert terms["occ"].item() > 0
    assert terms["loss"].item() == pytest.approx(
        0.5 * terms["sup"].item() + r * terms["consistency"].item() + 0.05 * r * terms["occ"].item(), rel=1e-5)
    assert [rampup_for_labels(n) for n in (4, 8, 16)] == [6000, 3000, 2250]
    cls = get_method("caml")
    assert cls.configure_options({"rampup_iterations": 0}, SimpleNamespace(labeled=8))["rampup_iterations"] == 3000
    assert cls.configure_options({"rampup_iterations": 500}, SimpleNamespace(labeled=8))["rampup_iterations"] == 500
    cfg = resolve_config({"data": "la:/nowhere", "method": "caml", "labeled": 16})
    assert cfg.method_options["rampup_iterations"] == 2250 and cfg.lr_schedule == "constant"
    assert (cfg.labeled_batch, cfg.unlabeled_batch, cfg.iterations) == (2, 2, 15000)


def test_caml_3d_step_and_saved_model_is_a_plain_vnet(tmp_path):
    m = make_caml(3, memory_per_class=8)
    g = torch.Generator().manual_seed(2)
    b = Batch(torch.randn(2, 1, 16, 16, 16, generator=g), torch.randint(0, 2, (2, 16, 16, 16), generator=g),
              torch.randn(2, 1, 16, 16, 16, generator=g), torch.tensor([0, 1]))
    terms = m.losses(b, 5000)
    terms["loss"].backward()
    assert m.branch_a.encoder[3][-1].inter.self_attn.in_proj_weight.grad.abs().sum() > 0  # CMA trains
    assert m.proj_v[0].weight.grad.abs().sum() > 0 and m.pred_a[0].weight.grad.abs().sum() > 0  # OCC trains heads
    net = m.inference_network()
    assert net is m.student and net.config["upsampling"] == "transpose"
    assert set(net.state_dict()) == set(build_network("vnet", num_classes=2, n_filters=4).state_dict())


def test_caml_resume_restores_the_memory_bank(tmp_path):
    from semiseg.errors import CancelledError
    cfg = {"data": "phantom:4", "labeled": 2, "patch_size": (32, 32), "labeled_batch": 2, "unlabeled_batch": 2,
           "iterations": 4, "checkpoint_every": 2, "val_every": 0, "log_every": 2, "deterministic": True,
           "device": "cpu", "threads": 1, "method": "caml", "method_options": {"memory_per_class": 8}}
    run_cfg = resolve_config(cfg)
    Trainer(run_cfg, tmp_path / "a", load_run_data(run_cfg)).run()
    n = {"k": 0}

    def stop():
        n["k"] += 1
        return n["k"] == 4  # cancel at the start of iteration 3

    with pytest.raises(CancelledError):
        run_cfg = resolve_config(cfg)
        Trainer(run_cfg, tmp_path / "b", load_run_data(run_cfg), should_stop=stop).run()
    run_cfg = resolve_config(cfg)
    Trainer(run_cfg, tmp_path / "b", load_run_data(run_cfg)).run(resume=True)
    a = load_checkpoint(tmp_path / "a" / "last.pt")["training"]["method"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["training"]["method"]
    assert a.keys() == b.keys() and "memory._extra_state" in a
    for k in a:
        if k == "memory._extra_state":
            ea, eb = a[k]["entries"], b[k]["entries"]
            assert ea.keys() == eb.keys() and ea
            assert all(torch.equal(x, y) for i in ea for x, y in zip(ea[i], eb[i]))
        else:
            assert torch.equal(a[k], b[k]), k
    best = load_checkpoint(tmp_path / "a" / "best.pt")
    assert not any(k.startswith(("branch_a", "proj", "pred", "memory")) for k in best["model"])


def test_caml_3d_on_phantom_volumes_end_to_end(tmp_path):
    # phantom volumes are 96x96x12: the UA-MT crop pads z by (16 - 12) // 2 + 3 = 5 per side for a 16-deep patch
    cfg = {"data": "phantom:3", "labeled": 1, "dim": 3, "network": "vnet", "patch_size": (32, 32, 16), "labeled_batch": 1,
           "unlabeled_batch": 1, "iterations": 2, "val_every": 0, "log_every": 1, "checkpoint_every": 100,
           "deterministic": True, "device": "cpu", "threads": 1, "method": "caml",
           "method_options": {"memory_per_class": 16}}
    run_cfg = resolve_config(cfg)
    summary = Trainer(run_cfg, tmp_path, load_run_data(run_cfg)).run()
    assert 0.0 <= summary["val"]["mean"]["dice"] <= 1.0
    ck = load_checkpoint(tmp_path / "best.pt")
    assert ck["network"]["name"] == "vnet" and ck["network"]["upsampling"] == "transpose"
    assert set(ck["model"]) == set(build_network("vnet", num_classes=4).state_dict())
    mem = load_checkpoint(tmp_path / "last.pt")["training"]["method"]["memory._extra_state"]["entries"]
    assert list(mem) == [0] and sum(t.shape[0] for t in mem[0]) > 0  # the one labeled volume's correct voxels


# ------------------------------------------------------------------------------------------------ ICL
def card_parameters(num_classes, size):
    """ICL's ``networks/unet_icl.py`` (github.com/zhuye98/ICL), layer by layer, for one SSPA/USCL module of the
    exact variant."""
    total = num_classes * 128  # Q0
    for d, h, n in zip((128, 64, 32), (8, 4, 2), token_counts_for(size)):
        total += d * d + d          # tokenizing 1x1 conv
        total += 2 * d              # token LayerNorm
        total += 2 * d + 2 * d      # class decoder: LN(query), LN(tokens)
        total += (d * d + d) + (d * 2 * d + 2 * d) + (d * d + d)  # W_q, W_kv, output projection
        total += 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)    # LN + query MLP d -> 4d -> d
        total += 2 * n + (n * n + n) + (n * n + n)                # LN_N + token MLP N -> N -> N
        total += h * 9 + 2 * h + h * h + 2 * h                    # separable conv (no bias) + 2 BN
        total += h + 1                                            # heads -> 1 conv
        total += d * (d // 2) + d // 2                            # query chaining Conv1d d -> d/2
    return total


def test_icl_exact_module_shapes_and_parameter_count_at_64():
    torch.manual_seed(0)
    mod = SemanticProxyModule(4, token_counts_for((64, 64)))
    assert count_parameters(mod) == card_parameters(4, (64, 64)) == 2_537_035
    assert [b.decoder.map_mixer.mlp[0].weight.shape for b in mod.blocks] == [(64, 64), (256, 256), (1024, 1024)]
    unet = build_network("unet", num_classes=4)
    _, f = unet(torch.randn(3, 1, 64, 64), return_features=True)
    feats = f.decoder[:3]
    assert [tuple(x.shape) for x in feats] == [(3, 128, 8, 8), (3, 64, 16, 16), (3, 32, 32, 32)]
    maps, queries = mod(feats)
    assert [tuple(x.shape) for x in maps] == [(3, 4, 8, 8), (3, 4, 16, 16), (3, 4, 32, 32)]
    assert [tuple(q.shape) for q in queries] == [(1, 4, 128), (1, 4, 64), (1, 4, 32)]
    assert queries[0].requires_grad and queries[0].grad_fn is not None  # exported queries: not detached
    uscl = SemanticProxyModule(4, token_counts_for((64, 64)))
    maps_u, _ = uscl(feats, queries)
    assert [tuple(x.shape) for x in maps_u] == [(3, 4, 8, 8), (3, 4, 16, 16), (3, 4, 32, 32)]
    # the full-size module (meta device: no memory) matches the card's ~573 M per module
    with torch.device("meta"):
        big = SemanticProxyModule(4, token_counts_for((256, 256)))
    assert count_parameters(big) == card_parameters(4, (256, 256)) == 572_903_755


def test_class_attention_reshapes_without_transpose():
    torch.manual_seed(0)
    d, heads, c, n, b = 16, 4, 3, 5, 2
    att = ClassQueryAttention(d, heads)
    q, x = torch.randn(b, c, d), torch.randn(b, n, d)
    out, logits = att(q, x)
    dh = d // heads
    qf = att.fc_q(q).reshape(b, c * d)             # the flat (class-major) projected queries
    kv = att.fc_kv(x)
    for bi in range(b):
        pooled = torch.zeros(heads * c * dh)
        for h in range(heads):
            k = kv[bi, :, h * dh:(h + 1) * dh]
            v = kv[bi, :, d + h * dh:d + (h + 1) * dh]
            for j in range(c):                     # slot j of head h = flat chunk h·C + j
                vec = qf[bi, (h * c + j) * dh:(h * c + j + 1) * dh]
                row = (k @ vec) / math.sqrt(dh)
                assert torch.allclose(logits[bi, j, h], row, atol=1e-5)
                pooled[(h * c + j) * dh:(h * c + j + 1) * dh] = torch.softmax(row, 0) @ v
        assert torch.allclose(out[bi], att.proj(pooled.reshape(c, d)), atol=1e-5)


def test_class_decoder_doubles_its_residuals():
    torch.manual_seed(0)
    dec = ClassDecoder(16, 4, tokens=6, drop_path=0.0)
    for lin in (dec.mlp[2], dec.map_mixer.mlp[2]):  # zero the residual branches' last layers
        torch.nn.init.zeros_(lin.weight), torch.nn.init.zeros_(lin.bias)
    q, t = torch.randn(2, 3, 16), torch.randn(2, 6, 16)
    out_q, out_a = dec(q, t, (2, 3))
    q1, a1 = dec.attn(dec.norm_query(q), dec.norm_tokens(t))
    assert torch.allclose(out_q, 2 * q1, atol=1e-6) and torch.allclose(out_a, 2 * a1, atol=1e-6)


def test_icl_loss_terms_match_hand_computations():
    # one 1x2 image, two classes; maps at the label size (the bilinear resize is then the identity)
    y = torch.tensor([[[0, 1]]])
    m = torch.tensor([[[[2.0, -1.0]], [[0.0, 1.0]]]], requires_grad=True)  # (B=1, C=2, 1, 2)
    p = [1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(2.0))]     # softmax class 0 at both pixels
    q = [1 - p[0], 1 - p[1]]
    ce = (-math.log(p[0]) - math.log(q[1])) / 2
    dice = ((1 - (2 * p[0] + 1e-5) / (p[0] ** 2 + p[1] ** 2 + 1 + 1e-5))
            + (1 - (2 * q[1] + 1e-5) / (q[0] ** 2 + q[1] ** 2 + 1 + 1e-5))) / 2
    assert aux_loss([m, m, m], y).item() == pytest.approx(ce + dice, rel=1e-6)
    # pseudo soft loss: soft Dice (non-squared) against the detached softmax of the UNet logits
    logits_u = torch.tensor([[[[0.0, 0.0]], [[0.0, math.log(3.0)]]]], requires_grad=True)  # probs (.5,.5), (.25,.75)
    t = [[0.5, 0.25], [0.5, 0.75]]
    s = [p, q]
    hand = sum(1 - (2 * sum(a * b for a, b in zip(s[c], t[c])) + 1e-5) / (sum(s[c]) + sum(t[c]) + 1e-5)
               for c in range(2)) / 2
    pse = pseudo_soft_loss([m], logits_u)
    assert pse.item() == pytest.approx(hand, rel=1e-6)
    pse.backward()
    assert logits_u.grad is None or logits_u.grad.abs().sum() == 0  # the UNet prediction is a fixed target
    # map consistency: softmax MSE against the detached SSPA maps, at map resolution
    ms = torch.tensor([[[[0.0, 0.0]], [[0.0, 0.0]]]], requires_grad=True)
    hand_c = sum((a - 0.5) ** 2 for a in p + q) / 4
    cons = map_consistency([m, m], [ms, ms])
    assert cons.item() == pytest.approx(hand_c, rel=1e-6)
    cons.backward()
    assert ms.grad is None or ms.grad.abs().sum() == 0
    # soft dice with upsampling: a 1x1 map resized bilinearly to 2x2 is constant
    one = torch.tensor([[[[1.0]], [[-1.0]]]])
    tgt = torch.zeros(1, 2, 2, 2)
    tgt[:, 0] = 1
    pu = torch.softmax(torch.tensor([1.0, -1.0]), 0)
    want = ((1 - (2 * 4 * pu[0] + 1e-5) / (4 * pu[0] + 4 + 1e-5)) + (1 - 1e-5 / (4 * pu[1] + 1e-5))) / 2
    assert pseudo_soft_loss([one], torch.log(tgt + 1e-30)).item() == pytest.approx(want.item(), rel=1e-5)
    assert soft_dice(tgt, tgt).item() == pytest.approx(0.0, abs=1e-6)  # identical maps; an empty class gives s/s


def make_icl(name="icl", size=(32, 32), batches=(0, 0), **opts):
    torch.manual_seed(0)
    cls = get_method(name)
    net = build_network("unet", num_classes=4)
    return cls(net, cls.Options(train_size=size if name == "icl" else (), drop_path=0.0, **opts),
               MethodContext(2, 4, 100, "phantom", labeled_batch=batches[0], unlabeled_batch=batches[1]))


def test_icl_total_loss_is_the_weighted_sum_of_its_terms():
    m = make_icl()
    g = torch.Generator().manual_seed(3)
    b = Batch(torch.randn(2, 1, 32, 32, generator=g), torch.randint(0, 4, (2, 32, 32), generator=g),
              torch.randn(2, 1, 32, 32, generator=g))
    torch.manual_seed(4)
    terms = m.losses(b, 0)
    assert terms["loss"].item() == pytest.approx(
        terms["sup"].item() + terms["aux"].item() + terms["pse"].item() + 50 * terms["cons"].item(), rel=1e-6)
    torch.manual_seed(4)  # the same dropout draws: L_sup is CE + Dice of the labeled pass
    logits = m.student(b.labeled_image)
    assert terms["sup"].item() == pytest.approx(supervised_loss(logits, b.labeled_label, "ce_plus_dice").item(), rel=1e-5)
    terms["loss"].backward()
    assert m.sspa.query.grad.abs().sum() > 0                       # Q0 learns
    assert m.uscl.query.grad is None                               # USCL uses SSPA's queries
    assert m.sspa.blocks[0].query_conv.weight.grad.abs().sum() > 0  # query chaining is in the graph
    with pytest.raises(SemiSegError, match="built for 32x32"):
        m.losses(Batch(torch.randn(1, 1, 64, 64), torch.zeros(1, 64, 64, dtype=torch.long), torch.randn(1, 1, 64, 64)), 0)


def test_icl_memory_estimate_and_clear_error(monkeypatch):
    m = make_icl(batches=(2, 2))
    logs = []
    m.on_start(logs.append)
    assert "estimated fp32 training memory at 32x32, batch 2+2" in logs[0]
    est = m.memory_estimate(2, 2, "cpu")
    assert est["parameters"] == count_parameters(m) and est["activations"] > 0
    assert est["total"] == 3 * 4 * est["parameters"] + est["optimizer_step"] + est["activations"]
    monkeypatch.setattr(icl_mod, "available_bytes", lambda device: 10 ** 6)
    with pytest.raises(SemiSegError, match="icl_lite"):
        m.on_start(logs.append)
    # the full-size exact module is refused before anything is allocated when the host cannot hold it
    monkeypatch.setattr(icl_mod, "available_bytes", lambda device: 2 * 10 ** 9)
    with pytest.raises(SemiSegError, match="1,145,807,510 training-only parameters"):
        make_icl(size=(256, 256))


def test_icl_checkpoint_is_a_plain_unet(tmp_path):
    cfg = {"data": "phantom:4", "labeled": 2, "patch_size": (32, 32), "labeled_batch": 2, "unlabeled_batch": 2,
           "iterations": 2, "checkpoint_every": 100, "val_every": 0, "log_every": 1, "deterministic": True,
           "device": "cpu", "threads": 1, "method": "icl"}
    resolved = resolve_config(cfg)
    assert tuple(resolved.method_options["train_size"]) == (32, 32)
    Trainer(resolved, tmp_path, load_run_data(resolved)).run()
    ck = load_checkpoint(tmp_path / "best.pt")
    assert ck["network"]["name"] == "unet" and ck["network"]["upsampling"] == "bilinear"  # ICL's unet_icl.py
    assert set(ck["model"]) == set(build_network("unet", num_classes=4).state_dict())
    assert not any("sspa" in k or "uscl" in k for k in ck["model"])
    last = load_checkpoint(tmp_path / "last.pt")["training"]["method"]
    assert any(k.startswith("sspa.") for k in last) and any(k.startswith("uscl.") for k in last)
    log = (tmp_path / "progress.jsonl").read_text()
    assert "estimated fp32 training memory" in log


@pytest.mark.parametrize("method,kept", [("icl", False), ("icl_lite", True)])
def test_gigabyte_parameter_runs_leave_glibc_returning_freed_memory(tmp_path, method, kept):
    """The kept-memory allocator setting fragments the heap around huge parameter tensors (ICL's exact token MLPs:
    killed for memory on a 24 GB host at 256x256): the loop skips it when a parameter tensor exceeds 64 MB.
    Exact ICL at 144x144 has a 5184x5184 token MLP (103 MB) and skips it; icl_lite keeps it."""
    from semiseg import machine
    if not (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"):
        pytest.skip("the allocator setting exists on glibc only")
    cfg = resolve_config({"data": "phantom:4", "labeled": 2, "patch_size": (144, 144), "labeled_batch": 1,
                          "unlabeled_batch": 1, "device": "cpu", "threads": 1, "method": method,
                          "method_options": {"memory_check": False}})
    trainer = Trainer(cfg, tmp_path, load_run_data(cfg))
    try:
        trainer.setup()
        largest = max(p.numel() * 4 for p in trainer.method.parameters())
        assert (largest > machine.LARGE_PARAMETER_BYTES) is not kept
        assert machine.allocator_status() == ("applied" if kept else "skipped: parameter tensors of 103 MB")
    finally:
        trainer.close()
        machine.keep_freed_memory(True)  # this process's setting for the tests that follow


# ---------------------------------------------------------------------------------- phantom training
# Protocol and matched baseline (CAML: Dice only; ICL: CE + Dice; same network and resize):
# Testing/phantom_comparison.py. Measured with this protocol, best validation Dice, matched supervised
# vs method, 1600 iterations, seeds 1337 / 1 / 2:
#   caml      0.8400 vs 0.8649 / 0.8344 vs 0.8612 / 0.8393 vs 0.8550   (+2.5 / +2.7 / +1.6 points)
#   icl_lite  0.8275 vs 0.8373 / 0.8325 vs 0.8467 / 0.8200 vs 0.8588   (+1.0 / +1.4 / +3.9)
#   icl       0.8275 vs 0.8406 / 0.8325 vs 0.8349 / 0.8200 vs 0.8364   (+1.3 / +0.2 / +1.6: mean +1.06, just over)
# About 2-3 min per method run, 1 min per baseline on one CPU thread. (At 240 iterations neither was reliably
# ahead: CAML 0.8559 vs 0.8462 / 0.8340 vs 0.8430 with seeds 1337 / 1.)
@pytest.mark.slow
@pytest.mark.parametrize("method", ["caml", "icl_lite", "icl"])
def test_method_beats_its_matched_supervised_baseline(method):
    assert_beats_matched_baseline(method, iterations=1600)
