"""Per-run figures (training curves, a qualitative figure) and the optional TensorBoard export."""
from __future__ import annotations

from pathlib import Path

from ..errors import SemiSegError
from .records import EventHandler

def make_run_figures(run_dir: str | Path, on_event: EventHandler | None = None, qualitative: bool = True) -> list[Path]:
    """curves.png (from progress.jsonl) and qualitative.png (best.pt on a few validation slices)."""
    from ..plots import plot_qualitative, plot_run_curves
    d = Path(run_dir)
    made = []
    jobs = [("curves.png", lambda: plot_run_curves(d, d / "curves.png"))]
    if qualitative:
        jobs.append(("qualitative.png", lambda: plot_qualitative(d, d / "qualitative.png")))
    for name, job in jobs:
        try:
            job()
            made.append(d / name)
        except SemiSegError as e:  # a figure never fails a benchmark
            if on_event:
                on_event({"event": "log", "level": "warning", "message": f"{d.name}: {name} skipped: {e}"})
    return made


def export_tensorboard(run_dir: str | Path) -> Path | None:
    """Replay progress.jsonl into TensorBoard event files (``RUN/tensorboard``) when TensorBoard is
    installed (an optional extra, never required); returns the folder or None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard not installed (ImportError) or broken: skip quietly
        return None
    from ..plots import read_progress
    d = Path(run_dir)
    tb = d / "tensorboard"
    if tb.is_dir():
        import shutil
        shutil.rmtree(tb)
    prog = read_progress(d)
    w = SummaryWriter(str(tb))
    try:
        for it, terms in prog["iterations"]:
            for k, v in terms.items():
                w.add_scalar(f"train/{k}", v, it)
        for it, dice, per_class in prog["validations"]:
            w.add_scalar("val/dice", dice, it)
            for c, v in per_class.items():
                w.add_scalar(f"val/dice_{c.replace(' ', '_')}", v, it)
    finally:
        w.close()
    return tb
