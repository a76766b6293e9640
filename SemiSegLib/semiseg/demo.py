"""``semiseg demo``'s check of a trained model: the held-out phantom volumes are written as files and
segmented through the path a user's scans take (:class:`~semiseg.predict.Segmenter`), then scored."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .data.classes import read_label
from .data.datasets import DataSplits
from .data.io import write_volume
from .data.segfile import write_segmentation
from .metrics import dice_per_class_fast


def segment_held_out(data: DataSplits, model: str | Path, test_dir: str | Path, pred_dir: str | Path,
                     device: str = "auto", on_event: Callable[[dict], None] | None = None) -> list[dict[int, float]]:
    """Each test case written to ``test_dir`` (NAME.nrrd and its truth NAME_truth.seg.nrrd), segmented into
    ``pred_dir`` (a ``predicted`` event each); returns per case the Dice per class value."""
    from .predict import Segmenter
    from .train.device import select_device
    test_dir, pred_dir = Path(test_dir), Path(pred_dir)
    test_dir.mkdir(parents=True, exist_ok=True)
    seg = Segmenter(model, select_device(device))
    values = [c.value for c in data.classes]
    per_case = []
    for ref in data.test:
        img, lab = ref.image(), ref.label()
        write_volume(test_dir / f"{ref.name}.nrrd", img)
        write_segmentation(test_dir / f"{ref.name}_truth.seg.nrrd", lab.array, lab.geometry, data.classes)
        r = seg.segment_file(test_dir / f"{ref.name}.nrrd", pred_dir)
        if on_event:
            on_event({"event": "predicted", **r})
        pred, _ = read_label(r["segmentation"], data.classes)
        per_case.append(dice_per_class_fast(pred.array, lab.array, values))
    return per_case
