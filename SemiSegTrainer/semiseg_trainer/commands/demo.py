"""``semiseg demo``: train on the built-in phantom, then segment held-out phantom volumes written as files."""
from __future__ import annotations

from pathlib import Path

from .. import protocol
from ..console import warner
from ..stop import StopFlag


def cmd_demo(ns, reporter) -> int:
    from semiseg.demo import segment_held_out
    from semiseg.run import prepare_run
    from semiseg.train.loop import Trainer

    out = Path(ns.out)
    explicit = {"data": "phantom", "method": ns.method, "device": ns.device}
    if ns.iterations:
        explicit["iterations"] = ns.iterations
    cfg, data, _ = prepare_run(explicit, out_dir=out / "run", resume=ns.resume, on_warning=warner(reporter))
    print(f"SemiSeg demo: {cfg.method} on the built-in phantom ({data.summary()}), {cfg.iterations} iterations")
    Trainer(cfg, out / "run", data=data, on_event=reporter, should_stop=StopFlag(out / "run")).run(resume=ns.resume)
    pred_dir = out / "predictions"
    per_case = segment_held_out(data, out / "run" / "best.pt", out / "test_images", pred_dir, ns.device, reporter)
    print(f"\nHeld-out phantom volumes ({len(per_case)}), Dice % per class:")
    for c in data.classes:
        print(f"  {c.name:<18} {100 * sum(d[c.value] for d in per_case) / len(per_case):6.2f}")
    mean = sum(sum(d.values()) / len(d) for d in per_case) / len(per_case)
    print(f"  {'mean':<18} {100 * mean:6.2f}")
    print(f"\nModel: {out / 'run' / 'best.pt'}\nSegmentations (.seg.nrrd, open in 3D Slicer): {pred_dir}")
    return protocol.EXIT_OK
