"""``semiseg bench --profile DIR``: where a training step's time goes, per operator.

``PROFILED_STEPS`` training steps (the Trainer's own :meth:`~semiseg.train.loop.Trainer.train_step`, their
batches drawn beforehand so that the profile holds the step alone) run under ``torch.profiler``. The result:

- ``DIR/<method>.trace.json``: the Chrome trace of those steps (open it in https://ui.perfetto.dev or
  chrome://tracing);
- ``ops``: every operator with its self time per step (device time on CUDA, where the kernels run; CPU time
  elsewhere), its share of the profiled self time and its calls per step, longest first;
- on CUDA, ``host_syncs``: the synchronising CUDA calls the steps made (``torch.cuda.set_sync_debug_mode``
  warns at each): every one stalls the host until the GPU has caught up, which is what small networks on a
  large GPU cannot afford.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

PROFILED_STEPS = 3
SHOWN_OPS = 12  # rows per method in the printed table (the JSON keeps every operator)


def profile_steps(trainer, first_step: int, out_dir: str | Path, name: str, steps: int = PROFILED_STEPS) -> dict:
    """Profile ``steps`` training steps of ``trainer`` at iterations ``first_step``, ... (see the module)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    batches = [trainer.next_batch() for _ in range(steps)]
    with warnings.catch_warnings(record=True) as caught, profile(activities=activities) as prof:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.synchronize(trainer.device)
            torch.cuda.set_sync_debug_mode("warn")
        try:
            for i, batch in enumerate(batches):
                trainer.train_step(batch, first_step + i)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
                torch.cuda.synchronize(trainer.device)  # the queued kernels belong to the profile
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trace = out_dir / f"{name}.trace.json"
    prof.export_chrome_trace(str(trace))
    clock = "device" if cuda else "cpu"
    field = "self_device_time_total" if cuda else "self_cpu_time_total"
    timed = sorted(((getattr(e, field), e) for e in prof.key_averages()), key=lambda te: te[0], reverse=True)
    total = sum(t for t, _ in timed) or 1.0
    ops = [{"name": e.key, "self_ms_per_step": t / 1000 / steps, "share": t / total, "calls_per_step": e.count / steps}
           for t, e in timed]
    host_syncs = sum("synchroniz" in str(w.message) for w in caught) if cuda else None
    return {"steps": steps, "clock": clock, "trace": str(trace), "self_ms_per_step": total / 1000 / steps,
            "host_syncs_per_step": host_syncs / steps if host_syncs is not None else None, "ops": ops}


def format_profile_table(rows: list[dict], shown: int = SHOWN_OPS) -> str:
    """The longest operators of each profiled method (the bench rows' ``profile``)."""
    lines = []
    for r in rows:
        p = r.get("profile")
        if not p:
            continue
        syncs = "" if p["host_syncs_per_step"] is None else f", {p['host_syncs_per_step']:g} host syncs per step"
        lines.append(f"profile {r['method']}: {p['self_ms_per_step']:.1f} ms of {p['clock']} self time per step "
                     f"over {p['steps']} steps{syncs}; trace: {p['trace']}")
        lines.append(f"  {'operator':<58}{'ms/step':>10}{'share %':>9}{'calls/step':>12}")
        for op in p["ops"][:shown]:
            name = op["name"] if len(op["name"]) <= 56 else op["name"][:55] + "…"
            lines.append(f"  {name:<58}{op['self_ms_per_step']:>10.2f}{100 * op['share']:>9.1f}"
                         f"{op['calls_per_step']:>12g}")
    return "\n".join(lines)
