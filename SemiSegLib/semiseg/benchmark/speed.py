"""``semiseg bench``: training speed, peak memory, data-loading share and inference time per method.

The speed part of :mod:`semiseg.benchmark` (whose grid measures accuracy): this measures speed.
It reuses the Trainer's set-up and its one training step (:meth:`Trainer.train_step`), so what is
measured is exactly what ``semiseg train`` runs.

Measurements (per method):

- ``it_per_s``: ``iterations`` steps after ``warmup`` steps (warm-up excluded: allocator, cudnn
  autotuning, ``torch.compile``). The steps run at iteration ``offset`` (default: the middle of the
  recipe's schedule), so loss terms that start after a delay or ramp are active.
- ``data_share``: time in ``BatchSource.next`` (batch drawing, augmentation, host→device copy) over the
  measured time, timed on its own before the measured steps (``iterations`` draws, the device synchronised
  after each): timed inside the loop, a draw on CUDA would wait for the previous step's queued kernels.
  The measured steps run as ``semiseg train`` runs them, without synchronising.
- ``peak_memory_mb``: CUDA: ``torch.cuda.max_memory_allocated`` over warm-up + measured steps. CPU: the
  process's peak resident set (Linux ``VmHWM``) over those steps, reset after set-up through
  ``/proc/self/clear_refs``; ``peak_growth_mb`` is that peak minus the resident set at the reset (the
  training step's own memory: activations, gradients, optimiser state). Where the peak cannot be reset
  (not Linux), the process lifetime peak (``ru_maxrss``) is reported and ``memory_kind`` says so.
- ``inference_s_per_volume``: ``predict_volume`` (the evaluation/segmentation path) on the first
  ``inference_volumes`` validation volumes (else test, else labeled training volumes: ``inference_source``), mean seconds per volume (on CUDA after one
  untimed warm-up volume).
- ``profile`` (with ``profile_dir``): afterwards, a few steps under ``torch.profiler``
  (:mod:`semiseg.benchmark.profile`): time per operator, a trace, the host synchronisations on CUDA.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..config import TrainConfig
from ..machine import describe, format_machine


def _status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def bench_method(cfg: TrainConfig, warmup: int = 3, iterations: int = 10, inference_volumes: int = 2,
                 offset: int | None = None, *, data, on_event=None, profile_dir: str | Path | None = None) -> dict:
    """Measure one configuration on its data (both from :func:`semiseg.run.prepare_run`). Returns a JSON-ready
    dict. ``profile_dir``: also profile a few steps there (the module's ``profile``)."""
    from ..inference import predict_volume
    from ..train.loop import Trainer

    with tempfile.TemporaryDirectory(prefix="semiseg-bench-") as tmp:
        trainer = Trainer(cfg, tmp, data=data)
        try:
            trainer.setup()
            # the method's own pre-flight check (ICL's memory estimate) stops a run that cannot fit, as in training
            trainer.method.on_start(lambda message: on_event and on_event({"event": "log", "level": "info",
                                                                           "message": str(message)}))
            return _measure(trainer, cfg, warmup, iterations, inference_volumes, offset, predict_volume, on_event,
                            profile_dir)
        finally:
            trainer.close()


def bench_methods(common: dict, data: str, methods: list[str], method_options: dict[str, dict] | None = None,
                  warmup: int = 3, iterations: int = 10, inference_volumes: int = 2, offset: int | None = None, *,
                  on_method=None, on_warning=None, on_event=None, profile_dir: str | Path | None = None,
                  on_rows=None) -> list[dict]:
    """``semiseg bench``: each method measured on the same cases (read once), its run assembled by
    :func:`semiseg.run.prepare_run` as ``semiseg train`` would (users' folders are planned; no plan.json is
    written). ``common``: the options every method is given; ``method_options``: per method, its ``--set``
    values; ``on_method(name)`` before each measurement; ``on_rows(rows)`` after each (the rows so far: a later method
    that fails or is killed loses none of them); ``profile_dir``: see :func:`bench_method`. Returns a row per
    method (:func:`bench_method`)."""
    from ..config import resolve_config
    from ..run import load_run_data, prepare_run
    rows, raw = [], None
    for m in methods:
        explicit = {**common, "data": data, "method": m,
                    **({"method_options": method_options[m]} if m in (method_options or {}) else {})}
        if raw is None:  # the same cases for every method: loaded once
            raw = load_run_data(resolve_config(explicit), explicit.get("dim") or None)
        cfg, cases, _ = prepare_run(explicit, data=raw, on_warning=on_warning)
        if on_method:
            on_method(m)
        rows.append(bench_method(cfg, warmup, iterations, inference_volumes, offset, data=cases, on_event=on_event,
                                 profile_dir=profile_dir))
        if on_rows:
            on_rows(rows)
    return rows


def _measure(trainer, cfg, warmup, iterations, inference_volumes, offset, predict_volume, on_event,
             profile_dir=None) -> dict:
    device = trainer.device
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    offset = cfg.iterations // 2 if offset is None else offset
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        memory_kind = "cuda_max_allocated"
    else:
        rss0 = _status_kb("VmRSS")
        memory_kind = "cpu_peak_rss_reset" if rss0 is not None and _reset_cpu_peak() else "cpu_peak_rss_lifetime"
    for i in range(warmup):
        trainer.train_step(trainer.next_batch(), offset + i)
    sync()
    # drawing batches timed on its own: inside the training loop a GPU's queued step would be counted with it
    t_data = 0.0
    for _ in range(iterations):
        a = time.perf_counter()
        trainer.next_batch()
        sync()
        t_data += time.perf_counter() - a
    terms = {}
    t0 = time.perf_counter()
    measured = 0
    for i in range(iterations):
        terms, _ = trainer.train_step(trainer.next_batch(), offset + warmup + i)
        measured += 1
    sync()
    total = time.perf_counter() - t0
    out = {
        "method": cfg.method, "data": cfg.data, "dim": cfg.dim, "network": cfg.network, "upsampling": cfg.upsampling,
        "patch_size": list(cfg.patch_size),
        "labeled_batch": cfg.labeled_batch, "unlabeled_batch": cfg.unlabeled_batch if trainer.source.unlabeled is not None else 0,
        "device": str(device), "precision": str(trainer.amp_dtype or torch.float32).replace("torch.", ""),
        "threads": torch.get_num_threads(), "warmup": warmup, "iterations": measured, "offset": offset,
        "seconds": round(total, 4), "it_per_s": measured / max(total, 1e-12),
        "data_seconds": round(t_data, 4), "data_share": min(max(t_data / max(total, 1e-12), 0.0), 1.0),
        "final_loss": float(terms["loss"].detach()) if terms else None, "memory_kind": memory_kind,
        "channels_last": trainer.memory_format is not None, "compile": cfg.compile, "machine": describe(),
    }
    if cuda:
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    elif memory_kind == "cpu_peak_rss_reset":
        hwm = _status_kb("VmHWM") or 0.0
        out["peak_memory_mb"] = hwm / 1024
        out["peak_growth_mb"] = max(hwm - rss0, 0.0) / 1024
    else:
        import resource
        out["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    source = "val" if trainer.data.val else "test" if trainer.data.test else "labeled"
    pool = trainer.data.val or trainer.data.test or trainer.data.labeled  # speed only: any volume will do
    refs = pool[:max(inference_volumes, 0)]
    times = []
    if refs:
        net = trainer.method.inference_network()
        was = net.training
        net.eval()
        half = trainer.amp_dtype is not None
        arrays = [r.image().array for r in refs]
        if cuda:  # untimed warm-up volume (cudnn autotuning, allocator); the CPU has nothing to warm
            predict_volume(net, arrays[0], trainer.meta, lcc=False, half=half)
        for arr in arrays:
            sync()
            a = time.perf_counter()
            predict_volume(net, arr, trainer.meta, lcc=False, half=half)
            sync()
            times.append(time.perf_counter() - a)
        net.train(was)
        out["inference_volume_shape"] = list(arrays[0].shape)
    out["inference_volumes"] = len(times)
    out["inference_source"] = source
    out["inference_s_per_volume"] = sum(times) / len(times) if times else None
    if profile_dir:  # last: nothing measured above runs under the profiler
        from .profile import profile_steps
        out["profile"] = profile_steps(trainer, offset + warmup + measured, profile_dir, cfg.method)
    if on_event:
        on_event({"event": "bench", **out})
    return out


def format_bench_table(rows: list[dict]) -> str:
    head = (f"{'method':<16}{'batch':>7}{'it/s':>9}{'s/it':>9}{'data %':>8}{'peak MB':>10}{'growth MB':>11}"
            f"{'infer s/vol':>13}  device/precision")
    lines = [head, "-" * len(head)]
    for r in rows:
        growth = r.get("peak_growth_mb")
        inf = r.get("inference_s_per_volume")
        batch = f"{r['labeled_batch']}+{r['unlabeled_batch']}"
        lines.append(f"{r['method']:<16}{batch:>7}{r['it_per_s']:>9.3f}{1 / max(r['it_per_s'], 1e-12):>9.3f}"
                     f"{100 * r['data_share']:>8.1f}{r['peak_memory_mb']:>10.0f}"
                     f"{(f'{growth:.0f}' if growth is not None else '-'):>11}"
                     f"{(f'{inf:.3f}' if inf is not None else '-'):>13}  {r['device']}/{r['precision']}")
    if rows:
        r = rows[0]
        lines.append(f"({r['data']}, {r['dim']}D patch {tuple(r['patch_size'])}; {r['iterations']} iterations measured "
                     f"after {r['warmup']} warm-up, at iteration {r['offset']}; {r['threads']} threads; "
                     f"memory: {r['memory_kind']}; inference over {r['inference_volumes']} volume(s))")
        lines.append(f"settings: precision {r['precision']}, channels-last {'on' if r.get('channels_last') else 'off'}, "
                     f"torch.compile {'on' if r.get('compile') else 'off'}, allocator "
                     f"{r.get('machine', {}).get('allocator', '?')} (keep freed memory)")
        if r.get("machine"):
            lines.append(format_machine(r["machine"]))
    return "\n".join(lines)


def write_bench_json(rows: list[dict], path: str | Path, command: str = "") -> None:
    atomic_write(path, json.dumps({"command": command, "torch": torch.__version__, "results": rows}, indent=2))
