"""Figures for runs and benchmarks (matplotlib, Agg backend, imported only when a figure is drawn).

- :func:`plot_run_curves`: one run's loss terms, learning rate (and loss weights) and validation Dice
  over iterations, from its ``progress.jsonl`` (``RUN/curves.png``, 1200 x 400 px).
- :func:`plot_overlay`: the runs of one setting overlaid: total loss and validation Dice, a colour per
  method and a line style per seed (1200 x 450 px).
- :func:`plot_qualitative`: the selected model (``best.pt``) on a few validation slices, image in grey
  with the ground-truth contours solid and the prediction's dashed, one colour per class (1200 x 400 px).

Every size is fixed (figure inches x :data:`DPI`, no tight bounding box), so figures line up in a report.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import SemiSegError

DPI = 100
RUN_CURVES_SIZE = (1200, 400)    # pixels (width, height)
OVERLAY_SIZE = (1200, 450)
QUALITATIVE_SIZE = (1200, 400)
QUALITATIVE_PANELS = 4
_NOT_TERMS = {"event", "time", "iteration", "iterations", "lr", "it_per_s", "eta_s", "run"}
_LINESTYLES = ["-", "--", ":", "-."]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SemiSegError("figures need matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _figure(size_px: tuple[int, int], **kw):
    plt = _pyplot()
    return plt, plt.figure(figsize=(size_px[0] / DPI, size_px[1] / DPI), dpi=DPI, **kw)


def _save(plt, fig, path: Path) -> Path:
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=DPI, format="png")
    finally:
        plt.close(fig)
    return path


def setting_slug(data: str, labeled: int) -> str:
    kind = data.split(":", 1)[0] or "data"
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in f"{kind}-L{labeled}")


def is_weight(term: str) -> bool:
    """Loss weights and schedules (plotted with the learning rate, not with the losses)."""
    t = term.lower()
    return "weight" in t or t.endswith("_w") or t.startswith("lambda") or t in ("threshold", "tau")


def read_progress(run_dir: str | Path) -> dict:
    """Iteration and validation records of ``progress.jsonl`` with interrupted attempts removed: when a
    resumed attempt starts at iteration s, records beyond s from the attempt before are dropped (they
    were logged after the checkpoint it resumed from), so no iteration is counted twice."""
    p = Path(run_dir) / "progress.jsonl"
    if not p.is_file():
        raise SemiSegError(f"no progress.jsonl in {run_dir}")
    its: dict[int, dict] = {}
    vals: dict[int, tuple[float, dict]] = {}
    lrs: dict[int, float] = {}
    for line in p.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        kind = e.get("event")
        if kind == "started":
            s = int(e.get("iteration", 0))
            for d in (its, vals, lrs):
                for k in [k for k in d if k > s]:
                    del d[k]
        elif kind == "iteration":
            it = int(e["iteration"])
            its[it] = {k: float(v) for k, v in e.items() if k not in _NOT_TERMS and isinstance(v, (int, float))}
            if "lr" in e:
                lrs[it] = float(e["lr"])
        elif kind == "validation":
            vals[int(e["iteration"])] = (float(e["dice"]), {k: float(v) for k, v in (e.get("dice_per_class") or {}).items()})
    return {"iterations": sorted(its.items()), "lr": sorted(lrs.items()),
            "validations": [(it, d, pc) for it, (d, pc) in sorted(vals.items())]}


def plot_run_curves(run_dir: str | Path, path: str | Path, title: str | None = None) -> Path:
    prog = read_progress(run_dir)
    if not prog["iterations"]:
        raise SemiSegError(f"{run_dir}: no iteration recorded yet")
    plt, fig = _figure(RUN_CURVES_SIZE)
    axes = fig.subplots(1, 3)
    its = [it for it, _ in prog["iterations"]]
    terms: list[str] = []
    for _, t in prog["iterations"]:
        terms += [k for k in t if k not in terms]
    ax = axes[0]
    for k in terms:
        if not is_weight(k):
            ax.plot(its, [t.get(k, np.nan) for _, t in prog["iterations"]], label=k, lw=1.2 if k == "loss" else 0.9)
    ax.set_title("loss terms")
    ax.set_xlabel("iteration")
    ax.legend(fontsize=7, loc="upper right")
    ax = axes[1]
    if prog["lr"]:
        ax.plot([i for i, _ in prog["lr"]], [v for _, v in prog["lr"]], color="black", label="lr")
    ax.set_title("learning rate (black) and loss weights")
    ax.set_xlabel("iteration")
    ax.set_ylabel("lr")
    weights = [k for k in terms if is_weight(k)]
    if weights:
        tw = ax.twinx()
        for k in weights:
            tw.plot(its, [t.get(k, np.nan) for _, t in prog["iterations"]], ls="--", label=k)
        tw.legend(fontsize=7, loc="center right")
    ax = axes[2]
    if prog["validations"]:
        vits = [v[0] for v in prog["validations"]]
        ax.plot(vits, [100 * v[1] for v in prog["validations"]], "o-", color="black", label="mean")
        classes = list(prog["validations"][-1][2])
        for c in classes:
            ax.plot(vits, [100 * v[2].get(c, np.nan) for v in prog["validations"]], ".--", lw=0.9, label=c)
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no validation", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("validation Dice %")
    ax.set_xlabel("iteration")
    fig.suptitle(title or Path(run_dir).name, fontsize=10)
    fig.subplots_adjust(left=0.05, right=0.97, wspace=0.3, top=0.85, bottom=0.13)
    return _save(plt, fig, path)


def plot_overlay(runs: list[tuple[str, str, Path]], path: str | Path, title: str = "") -> Path:
    """``runs``: (label, method, run_dir); one colour per method, one line style per run of a method."""
    plt, fig = _figure(OVERLAY_SIZE)
    ax_loss, ax_dice = fig.subplots(1, 2)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods: list[str] = []
    count: dict[str, int] = {}
    drawn = 0
    for label, method, d in runs:
        try:
            prog = read_progress(d)
        except SemiSegError:
            continue
        if method not in methods:
            methods.append(method)
        color = colors[methods.index(method) % len(colors)]
        ls = _LINESTYLES[count.get(method, 0) % len(_LINESTYLES)]
        count[method] = count.get(method, 0) + 1
        if prog["iterations"]:
            ax_loss.plot([i for i, _ in prog["iterations"]], [t.get("loss", np.nan) for _, t in prog["iterations"]],
                         color=color, ls=ls, lw=1, label=label)
            drawn += 1
        if prog["validations"]:
            ax_dice.plot([v[0] for v in prog["validations"]], [100 * v[1] for v in prog["validations"]],
                         color=color, ls=ls, marker=".", lw=1, label=label)
    if not drawn:
        plt.close(fig)
        raise SemiSegError("no run with recorded iterations to plot")
    ax_loss.set_title("total loss")
    ax_loss.set_xlabel("iteration")
    ax_loss.legend(fontsize=7)
    ax_dice.set_title("validation Dice % (mean over classes)")
    ax_dice.set_xlabel("iteration")
    if ax_dice.lines:
        ax_dice.legend(fontsize=7, loc="lower right")
    else:
        ax_dice.text(0.5, 0.5, "no validation", ha="center", va="center", transform=ax_dice.transAxes)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.98, wspace=0.2, top=0.88, bottom=0.12)
    return _save(plt, fig, path)


def _slice_dice(pred: np.ndarray, ref: np.ndarray, values: list[int]) -> float | None:
    scores = []
    for v in values:
        p, r = pred == v, ref == v
        if p.any() or r.any():
            scores.append(2 * np.logical_and(p, r).sum() / (p.sum() + r.sum()))
    return float(np.mean(scores)) if scores else None


def choose_slices(label: np.ndarray, n: int) -> list[int]:
    """``n`` slice indices (last axis) spread over the slices that hold foreground, largest first when
    only one is asked for; the middle slice when there is no foreground."""
    area = (label > 0).reshape(-1, label.shape[-1]).sum(0)
    fg = np.flatnonzero(area)
    if fg.size == 0:
        return [label.shape[-1] // 2][:n]
    if n == 1:
        return [int(fg[np.argmax(area[fg])])]
    picks = [int(fg[int(round(q * (fg.size - 1)))]) for q in np.linspace(0.2, 0.8, n)]
    return sorted(set(picks))


def plot_qualitative(run_dir: str | Path, path: str | Path, n_panels: int = QUALITATIVE_PANELS,
                     device: str = "cpu") -> Path:
    """The run's selected model on up to ``n_panels`` validation slices (test cases when there is no
    validation split): ground truth solid, prediction dashed."""
    from .checkpoint import load_checkpoint, network_from_checkpoint
    from .data.datasets import load_dataset
    from .inference import predict_volume
    d = Path(run_dir)
    ckpt = load_checkpoint(d / "best.pt")
    meta, cfg = ckpt["meta"], ckpt.get("config") or json.loads((d / "config.json").read_text())
    data = load_dataset(cfg["data"], cfg.get("labeled") or None, cfg.get("val_split") or None,
                        cfg.get("test_split") or None, cfg.get("dim"), class_map=cfg.get("class_map") or "")
    refs, split = (data.val, "val") if data.val else (data.test, "test")
    if not refs:
        raise SemiSegError(f"{d}: the dataset has no validation or test case to show")
    net = network_from_checkpoint(ckpt, device)
    n_cases = min(len(refs), n_panels if meta["dim"] == 2 else 1)  # 3D sliding windows are slow on a CPU
    per_case = -(-n_panels // n_cases)
    panels = []
    for ref in refs[:n_cases]:
        image, label = ref.image().array, ref.label().array
        if image.ndim == 2:
            image, label = image[..., None], label[..., None]
        pred = predict_volume(net, image, meta, half=False)
        for k in choose_slices(label, per_case):
            panels.append((ref.name, k, image[..., k], label[..., k], pred[..., k]))
    panels = panels[:n_panels]
    classes = meta["classes"]
    values = [c["value"] for c in classes]
    plt, fig = _figure(QUALITATIVE_SIZE)
    axes = fig.subplots(1, n_panels)
    axes = np.atleast_1d(axes)
    for ax in axes:
        ax.axis("off")
    for ax, (name, k, img, lab, prd) in zip(axes, panels):
        lo, hi = np.percentile(img, [1, 99]) if img.size else (0, 1)
        ax.imshow(img.T, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
        for c in classes:
            for mask, ls in ((lab == c["value"], "solid"), (prd == c["value"], "dashed")):
                if mask.any() and not mask.all():
                    ax.contour(mask.T.astype(np.float32), levels=[0.5], colors=[tuple(c["color"])],
                               linestyles=ls, linewidths=1.5)
        dice = _slice_dice(prd, lab, values)
        ax.set_title(f"{name} slice {k}\nslice Dice {'–' if dice is None else f'{100 * dice:.1f}%'}", fontsize=8)
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=tuple(c["color"]), lw=2, label=c["name"]) for c in classes]
    handles += [Line2D([], [], color="black", ls="-", label="ground truth"),
                Line2D([], [], color="black", ls="--", label="prediction")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(f"{d.name}: {meta.get('method')} on {split} (iteration {ckpt.get('iteration')})", fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.82, bottom=0.1, wspace=0.05)
    return _save(plt, fig, path)
