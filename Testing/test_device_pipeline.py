"""Issue 8, data side: the batched (device) augmentation reproduces the per-sample reference
transforms draw for draw, distributed shards concatenate to the single-process batch, foreground-aware
3D sampling does what it promises, and the prefetch thread changes nothing but timing."""
import numpy as np
import pytest
import torch

from semiseg.data.datasets import CaseRef, load_phantom
from semiseg.data.pipeline import BatchSource, IndexStream, SliceStore, VolumeStore
from semiseg.data.transforms import (BatchedRandomGenerator2D, random_crop_3d, random_generator_2d,
                                     random_rot_flip_3d, rotate_nearest)
from semiseg.data.volume import Volume
from semiseg.errors import SemiSegError

CPU = torch.device("cpu")


def _ref(name, img, lab=None):
    return CaseRef(name, lambda: Volume(img), (lambda: Volume(lab)) if lab is not None else None)


def _volumes(shapes, seed=0, classes=2):
    rng = np.random.default_rng(seed)
    out = []
    for i, s in enumerate(shapes):
        img = rng.normal(size=s).astype(np.float32)
        lab = (rng.random(s) * (classes + 1)).astype(np.uint8)
        out.append((f"v{i}", img, lab))
    return out


# ------------------------------------------------------------------ 2D: batched == reference
def test_2d_codes_are_the_reference_operations():
    """Each transform code, applied in batch, equals the operation it names."""
    aug = BatchedRandomGenerator2D((12, 12))
    x = torch.rand(1, 1, 12, 12)
    lab = (torch.rand(1, 12, 12) * 4).to(torch.uint8)
    codes = torch.arange(49)
    out, ol = aug.apply(x.expand(49, 1, 12, 12), lab.expand(49, 12, 12), codes)
    assert torch.equal(out[0], x[0]) and torch.equal(ol[0], lab[0])
    for k in range(4):
        for a in range(2):
            c = 1 + 2 * k + a
            assert torch.equal(out[c, 0], torch.flip(torch.rot90(x[0, 0], k, (0, 1)), (a,)))
            assert torch.equal(ol[c], torch.flip(torch.rot90(lab[0], k, (0, 1)), (a,)))
    angles = torch.arange(-20, 20).float()
    rot = rotate_nearest(x.expand(40, 1, 12, 12).contiguous(), angles)
    assert torch.equal(out[9:], rot)
    assert (out[9:] == 0).any()  # the rotations do zero-fill corners


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_2d_batched_augmentation_matches_reference_on_same_draws(seed):
    g_ref, g_new = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    img = torch.randn(64, 1, 32, 32)
    lab = (torch.rand(64, 32, 32) * 4).to(torch.uint8)
    ri, rl = random_generator_2d(img, lab, g_ref)
    aug = BatchedRandomGenerator2D((32, 32))
    codes = aug.draw(64, g_new)
    bi, bl = aug.apply(img, lab, codes)
    assert torch.equal(ri, bi) and torch.equal(rl, bl)
    assert torch.equal(g_ref.get_state(), g_new.get_state())  # same number of draws
    assert len(set(codes.tolist())) > 20  # all three branches exercised


def _bar_slice(h=97, w=49):
    """A non-square label slice: an off-centre bar along the rows and a block (classes 1 and 2)."""
    yy, xx = np.mgrid[:h, :w]
    lab = ((np.abs(yy - 40) < 30) & (np.abs(xx - 20) < 6)).astype(np.float32)
    lab[70:90, 30:44] = 2
    return lab


def test_rotation_of_a_non_square_array_is_scipys():
    from scipy import ndimage
    lab = _bar_slice()
    for a in (-19, 13):
        ours = rotate_nearest(torch.from_numpy(lab)[None, None], torch.tensor([float(a)]))[0, 0].numpy()
        assert np.array_equal(ours, ndimage.rotate(lab, a, order=0, reshape=False))


def test_2d_rotation_is_made_in_the_slices_native_geometry_as_the_references():
    """SSL4MIS RandomGenerator rotates the native slice (scipy rotate, order 0, same size) and then zooms it
    to the training size (order 0). Rotating the zoomed square with the slice's native aspect is that map:
    on a 97x49 slice zoomed to 64x64, the foreground agrees with the reference's at 0.92-0.94 (two nearest
    samplings instead of one); rotating the square as if its pixels were square shears it (0.53-0.75)."""
    from scipy import ndimage
    from semiseg.data.transforms import zoom_nearest
    lab, s = _bar_slice(), 64
    h, w = lab.shape
    zoomed = zoom_nearest(torch.from_numpy(lab), (s, s))[None, None]

    def agreement(a, b):
        fg = (a > 0) | (b > 0)
        return ((a == b) & fg).sum() / fg.sum()
    for angle in (-19, -8, 13, 19):
        ref = ndimage.zoom(ndimage.rotate(lab, angle, order=0, reshape=False), (s / h, s / w), order=0)
        native = rotate_nearest(zoomed, torch.tensor([float(angle)]), torch.tensor([(h - 1) / (w - 1)]))[0, 0]
        square = rotate_nearest(zoomed, torch.tensor([float(angle)]))[0, 0]
        assert agreement(ref, native.numpy()) > 0.9 and agreement(ref, square.numpy()) < 0.8, angle


@pytest.mark.parametrize("seed", [0, 1])
def test_2d_store_rotates_each_slice_in_its_native_geometry(seed):
    """The store records each slice's native aspect; its batched augmentation equals the per-sample
    reference given the same aspects, draw for draw, and differs from the square rotation."""
    rng = np.random.default_rng(seed)
    shapes = [(40, 24, 3), (24, 24, 2), (30, 50, 3)]
    refs = [_ref(f"s{i}", rng.normal(size=sh).astype(np.float32), (rng.random(sh) * 3).astype(np.uint8))
            for i, sh in enumerate(shapes)]
    store = SliceStore(refs, (32, 32), "none", True)
    assert store.aspect.tolist() == pytest.approx([39 / 23] * 3 + [1.0] * 2 + [29 / 49] * 3)
    idx = torch.arange(8).repeat(8)
    g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    bi, bl = store.sample(idx, g1)
    ri, rl = random_generator_2d(store.images[idx], store.labels[idx], g2, aspect=store.aspect[idx])
    assert torch.equal(bi, ri) and torch.equal(bl, rl)
    g3 = torch.Generator().manual_seed(seed)
    si, _ = random_generator_2d(store.images[idx], store.labels[idx], g3)
    assert not torch.equal(bi, si)  # some non-square slice was rotated by an angle


# ------------------------------------------------------------------ 3D: batched == reference
def _reference_3d(vols, idx, patch, gen, rot_flip=True):
    imgs, labs = [], []
    for i in idx.tolist():
        img, lab = torch.from_numpy(vols[i][1]), torch.from_numpy(vols[i][2])
        if rot_flip:
            img, lab = random_rot_flip_3d(img, lab, gen)
        img, lab = random_crop_3d(img, lab, patch, gen)
        imgs.append(img)
        labs.append(lab)
    return torch.stack(imgs).unsqueeze(1), torch.stack(labs)


@pytest.mark.parametrize("rot_flip", [True, False])
def test_3d_batched_rot_flip_crop_matches_reference(rot_flip):
    # sizes differ; some sides are smaller than / equal to the patch (UA-MT padding), non-square x-y
    shapes = [(40, 30, 20), (20, 26, 17), (32, 16, 24), (16, 16, 16), (50, 20, 12)]
    vols = _volumes(shapes)
    patch = (16, 16, 16)
    store = VolumeStore([_ref(n, i, l) for n, i, l in vols], patch, "none", True, rot_flip=rot_flip)
    g_ref, g_new = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(12):
        idx = torch.randint(0, len(shapes), (4,), generator=g_ref)
        torch.randint(0, len(shapes), (4,), generator=g_new)
        ri, rl = _reference_3d(vols, idx, patch, g_ref, rot_flip)
        bi, bl = store.sample(idx, g_new)
        assert torch.equal(ri, bi) and torch.equal(rl, bl)
    assert torch.equal(g_ref.get_state(), g_new.get_state())


# ------------------------------------------------------------------ BatchSource == the pre-issue-8 pipeline
def _reference_source_2d(refs_l, refs_u, patch, bl, bu, seed, extra, steps):
    """The per-sample pipeline as it was: same stores, per-sample reference RandomGenerator."""
    sl = SliceStore(refs_l, patch, "zscore", True)
    su = SliceStore(refs_u, patch, "zscore", False)
    g = torch.Generator().manual_seed(seed)
    ls, us = IndexStream(len(sl), g), IndexStream(len(su), g)
    out = []
    for _ in range(steps):
        li = ls.take(bl)
        a, b = random_generator_2d(sl.images[li], sl.labels[li], g)
        ui = us.take(bu)
        u, _ = random_generator_2d(su.images[ui], None, g)
        ex = []
        for _ in range(extra):
            xi = torch.randint(0, len(su), (bu,), generator=g)
            ex.append(random_generator_2d(su.images[xi], None, g)[0])
        out.append((a, b.long(), u, li, ui, ex))
    return out


def _same(batch, ref):
    a, b, u, li, ui, ex = ref
    assert torch.equal(batch.labeled_image, a) and torch.equal(batch.labeled_label, b)
    assert torch.equal(batch.unlabeled_image, u)
    assert torch.equal(batch.labeled_index, li) and torch.equal(batch.unlabeled_index, ui)
    assert len(batch.extra_unlabeled) == len(ex) and all(torch.equal(x, y) for x, y in zip(batch.extra_unlabeled, ex))


def test_batch_source_2d_yields_the_reference_batches():
    d = load_phantom(4, 2, n_val=0, n_test=0)
    ref = _reference_source_2d(d.labeled, d.unlabeled, (32, 32), 3, 3, 7, 1, 5)
    src = BatchSource(d.labeled, d.unlabeled, 2, (32, 32), "zscore", 3, 3, 7, CPU, 1)
    for r in ref:
        _same(src.next(), r)


def test_batch_source_3d_yields_the_reference_batches():
    vols = _volumes([(40, 30, 20), (20, 26, 17), (36, 36, 18)], seed=1)
    uvols = _volumes([(30, 40, 20), (24, 24, 24)], seed=2)
    patch = (16, 16, 16)
    src = BatchSource([_ref(n, i, l) for n, i, l in vols], [_ref(n, i) for n, i, _ in uvols], 3, patch, "none",
                      2, 2, 3, CPU)
    g = torch.Generator().manual_seed(3)
    ls, us = IndexStream(3, g), IndexStream(2, g)
    for _ in range(6):
        b = src.next()
        li = ls.take(2)
        a, lab = _reference_3d(vols, li, patch, g)
        ui = us.take(2)
        u, _ = _reference_3d(uvols, ui, patch, g)
        assert torch.equal(b.labeled_image, a) and torch.equal(b.labeled_label, lab.long())
        assert torch.equal(b.unlabeled_image, u)


# ------------------------------------------------------------------ sharding
@pytest.mark.parametrize("dim", [2, 3])
def test_rank_slices_concatenate_to_the_single_process_batch(dim):
    if dim == 2:
        d = load_phantom(4, 2, n_val=0, n_test=0)
        args = (d.labeled, d.unlabeled, 2, (32, 32), "zscore")
    else:
        vols = _volumes([(40, 30, 20), (20, 26, 17), (36, 36, 18)], seed=1)
        args = ([_ref(n, i, l) for n, i, l in vols], [_ref(n, i) for n, i, _ in vols], 3, (16, 16, 16), "none")
    full = BatchSource(*args, 4, 4, 11, CPU, 1, foreground_share=0.5)
    shards = [BatchSource(*args, 4, 4, 11, CPU, 1, foreground_share=0.5, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        f = full.next()
        parts = [s.next() for s in shards]
        assert all(p.n_labeled == 2 for p in parts)
        for name in ("labeled_image", "labeled_label", "unlabeled_image", "labeled_index", "unlabeled_index"):
            assert torch.equal(getattr(f, name), torch.cat([getattr(p, name) for p in parts]))
        assert torch.equal(f.extra_unlabeled[0], torch.cat([p.extra_unlabeled[0] for p in parts]))
    with pytest.raises(SemiSegError, match="divisible"):
        BatchSource(*args, 3, 4, 11, CPU, rank=0, world_size=2)


# ------------------------------------------------------------------ foreground-aware sampling
def _fg_source(share, lb=4, seed=0, big=True):
    img = np.zeros((64, 64, 48), np.float32)
    lab = np.zeros((64, 64, 48), np.uint8)
    lab[2:4, 60:62, 1:3] = 2           # tiny structure in one corner (8 voxels)
    if big:
        lab[40:64, 0:24, 24:48] = 1    # a large one far from it (13824 voxels)
    img[:] = lab
    return BatchSource([_ref("a", img, lab)], [], 3, (16, 16, 16), "none", lb, 0, seed, CPU,
                       foreground_share=share)


def test_foreground_share_one_every_patch_has_foreground_and_classes_uniform():
    src = _fg_source(1.0)
    has_tiny, n = 0, 0
    for _ in range(50):
        lab = src.next().labeled_label
        assert all((lab[i] > 0).any() for i in range(lab.shape[0]))
        has_tiny += int(sum((lab[i] == 2).any() for i in range(lab.shape[0])))
        n += lab.shape[0]
    # the class is drawn uniformly over the two present classes, not in proportion to voxel counts
    assert 0.38 < has_tiny / n < 0.62


def test_foreground_share_raises_the_rate_of_a_tiny_structure():
    def rate(share):
        src = _fg_source(share, lb=4, seed=1, big=False)
        hits = [bool((b == 2).any()) for _ in range(60) for b in src.next().labeled_label]
        return sum(hits) / len(hits)
    r0, r5 = rate(0.0), rate(0.5)
    assert r0 < 0.1          # uniform crops rarely see 8 voxels in a 64x64x48 volume
    assert r5 >= 0.5         # 2 of every 4 labeled patches are centred on it


def test_foreground_count_per_batch():
    src = _fg_source(0.33, lb=3)
    assert src._forced(3) == [False, False, True] and src._forced(2) == [False, True]
    assert _fg_source(0.0)._forced(4) is None


def _fg_slices(share, lb=4, seed=0):
    """20 slices of 32x32: a large class 1 on slices 10-19, a 2x2-pixel class 2 at the centre of slice 3 only
    (the centre, so that the 2D pipeline's rotations never move it out of the slice)."""
    lab = np.zeros((32, 32, 20), np.uint8)
    lab[4:28, 4:12, 10:] = 1
    lab[15:17, 15:17, 3] = 2
    return BatchSource([_ref("a", lab.astype(np.float32), lab)], [], 2, (32, 32), "none", lb, 0, seed, CPU,
                       foreground_share=share)


def test_2d_foreground_share_draws_slices_that_contain_a_random_present_class():
    def draws(share):
        src = _fg_slices(share)
        labs = [lab for _ in range(60) for lab in src.next().labeled_label]
        share_of = lambda cond: sum(bool(cond(lab).any()) for lab in labs) / len(labs)  # noqa: E731
        return share_of(lambda lab: lab > 0), share_of(lambda lab: lab == 2)
    any0, tiny0 = draws(0.0)
    any1, tiny1 = draws(1.0)
    assert tiny0 < 0.15 and 0.35 < any0 < 0.65   # uniform over slices: 1 of 20 has the tiny class, 10 of 20 any
    assert any1 == 1.0                           # every slice drawn shows a foreground class
    assert 0.38 < tiny1 < 0.62                   # the class is drawn uniformly, not by slice or pixel count
    src = _fg_slices(0.5)  # the last 2 of 4 are forced, and the batch's slice indices say which slices were used
    forced = [int(i) for _ in range(30) for i in src.next().labeled_index[2:]]
    assert set(forced) <= {3, *range(10, 20)} and 3 in forced


# ------------------------------------------------------------------ prefetch thread
def test_prefetch_gives_the_same_batches_and_a_resumable_state():
    d = load_phantom(4, 2, n_val=0, n_test=0)
    args = (d.labeled, d.unlabeled, 2, (32, 32), "zscore", 2, 2, 5, CPU)
    plain, pre = BatchSource(*args), BatchSource(*args, prefetch=3)
    for _ in range(4):
        a, b = plain.next(), pre.next()
        assert torch.equal(a.labeled_image, b.labeled_image) and torch.equal(a.unlabeled_image, b.unlabeled_image)
    s = pre.state_dict()  # the thread has run ahead; the state must be that after the 4 batches handed out
    ref = plain.state_dict()
    assert torch.equal(s["gen"], ref["gen"]) and s["lab"]["pos"] == ref["lab"]["pos"]
    resumed = BatchSource(*args, prefetch=2)
    resumed.load_state_dict(s)
    for _ in range(3):
        a, b = plain.next(), resumed.next()
        assert torch.equal(a.labeled_image, b.labeled_image) and torch.equal(a.labeled_label, b.labeled_label)
    pre.close()
    resumed.close()
    assert pre._thread is None


def test_data_placement_and_option_checks():
    d = load_phantom(3, 1, n_val=0, n_test=0)
    src = BatchSource(d.labeled, d.unlabeled, 2, (32, 32), "zscore", 2, 2, 0, CPU, data_on_device="on")
    assert src.data_device == CPU and src.labeled.images.device == CPU
    with pytest.raises(SemiSegError, match="foreground_share"):
        BatchSource(d.labeled, [], 2, (32, 32), "zscore", 2, 0, 0, CPU, foreground_share=1.5)
    with pytest.raises(SemiSegError, match="data_on_device"):
        BatchSource(d.labeled, [], 2, (32, 32), "zscore", 2, 0, 0, CPU, data_on_device="gpu")


def test_training_with_prefetch_resumes_bit_exact_like_without(tmp_path):
    """A run with the prefetch thread, cancelled and resumed, ends with the very weights of a plain run."""
    from semiseg.checkpoint import load_checkpoint
    from semiseg.config import resolve_config
    from semiseg.run import load_run_data
    from semiseg.errors import CancelledError
    from semiseg.train.loop import Trainer
    tiny = {"data": "phantom:6", "labeled": 2, "patch_size": (32, 32), "labeled_batch": 2, "unlabeled_batch": 2,
            "iterations": 8, "checkpoint_every": 4, "val_every": 0, "log_every": 2, "deterministic": True,
            "device": "cpu", "threads": 1, "method": "mean_teacher"}
    run_cfg = resolve_config(tiny)
    Trainer(run_cfg, tmp_path / "a", load_run_data(run_cfg)).run()
    polls = {"n": 0}

    def stop():
        polls["n"] += 1
        return polls["n"] == 6

    with pytest.raises(CancelledError):
        run_cfg = resolve_config(dict(tiny, prefetch=3))
        Trainer(run_cfg, tmp_path / "b", load_run_data(run_cfg), should_stop=stop).run()
    run_cfg = resolve_config(dict(tiny, prefetch=2))
    Trainer(run_cfg, tmp_path / "b", load_run_data(run_cfg)).run(resume=True)
    import threading  # a finished or cancelled run leaves no prefetch thread behind
    assert not [t for t in threading.enumerate() if t.name == "semiseg-prefetch"]
    a = load_checkpoint(tmp_path / "a" / "last.pt")["training"]["method"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["training"]["method"]
    assert all(torch.equal(a[k], b[k]) for k in a)
