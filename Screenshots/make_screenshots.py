"""Regenerate the Extensions Index screenshot (Screenshots/semiseg-phantom.png): Mean Teacher trained on the
built-in phantom (4 labeled + 16 unlabeled cases), its training curves and its predictions on held-out slices,
drawn by the engine's own figure code. Run from the repository root (a few minutes on a laptop CPU):

    python Screenshots/make_screenshots.py
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    from semiseg.plots import plot_qualitative, plot_run_curves
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "phantom-mean_teacher"
        subprocess.run([sys.executable, "-m", "semiseg_trainer", "--no-json", "train", "--data", "phantom:20",
                        "--labeled", "4", "--method", "mean_teacher", "--iterations", "400", "--val-every", "100",
                        "--threads", "2", "--device", "cpu", "--out", str(run)], check=True)
        curves = plot_run_curves(run, Path(tmp) / "curves.png", title="SemiSeg: Mean Teacher, 4 labeled + 16 unlabeled")
        panels = plot_qualitative(run, Path(tmp) / "panels.png")
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.image as mpimg
        import matplotlib.pyplot as plt
        top, bottom = mpimg.imread(curves), mpimg.imread(panels)
        width = max(top.shape[1], bottom.shape[1])
        fig = plt.figure(figsize=(width / 100, (top.shape[0] + bottom.shape[0]) / 100), dpi=100)
        for i, img in enumerate((top, bottom)):
            ax = fig.add_subplot(2, 1, i + 1)
            ax.imshow(img)
            ax.axis("off")
        fig.subplots_adjust(0, 0, 1, 1, 0, 0)
        out = HERE / "semiseg-phantom.png"
        fig.savefig(out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
