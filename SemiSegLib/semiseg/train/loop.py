"""The one training loop shared by every method.

It owns what methods must not care about: device and precision, seeding, the optimiser and lr
schedule, the EMA teacher, validation and checkpoint selection, atomic checkpoints and exact resume,
progress events, cancellation and clear errors, and data-parallel training over several processes
(``torchrun``; see :mod:`.distributed`). A method only returns its loss terms.

One training step is :meth:`Trainer.train_step` (used by the loop and by ``semiseg bench``): it does not
read anything back to the host; the loss terms accumulate on the device and are read once per
``log_every`` window (all-reduced over the ranks in the same single collective).
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch

from .. import finetune
from .. import runlock
from ..atomic import atomic_write
from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import TrainConfig, selection_fallback
from ..data.datasets import DataSplits
from ..data.pipeline import BatchSource
from ..errors import CancelledError, SemiSegError
from ..evaluation import evaluate_cases, summarize
from ..machine import keep_freed_memory
from ..methods import MethodContext, get_method
from ..methods.reference import protocol_label
from ..networks import build_network, channels_last_format
from ..schedules import ema_decay, learning_rate
from . import distributed as D
from .budget import TimeBudget, apply_plan, parse_duration, schedule_options
from .device import (_channels_last, check_compiler, peak_memory_mb,  # noqa: F401 (re-exported)
                     resolve_precision, seed_everything, select_device)

EventHandler = Callable[[dict], None]


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, alpha: float) -> None:
    """θ_t ← α θ_t + (1 − α) θ_s over the parameters (SSL4MIS ``update_ema_variables``), one fused call."""
    t = [p for p in teacher.parameters()]
    s = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t, alpha)
    torch._foreach_add_(t, s, alpha=1 - alpha)


TAIL_TRAINING_PER_VALIDATION = 4  # a budget's run extended at its end: training time per extra validation

class Trainer:
    """Train ``cfg.method`` on ``data`` into ``out_dir`` (config.json, best.pt, last.pt, progress.jsonl,
    metrics.json). ``cfg`` and ``data`` come from :func:`semiseg.run.prepare_run`."""

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, data: DataSplits,
                 on_event: EventHandler | None = None, should_stop: Callable[[], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.clock = clock  # the time budget's clock (tests inject a fake one)
        self.out = Path(out_dir)
        self.data = data
        self.on_event = on_event
        self.should_stop = should_stop or (lambda: False)
        self.dist = D.DistInfo()  # set by setup (several processes under torchrun)

    # ------------------------------------------------------------------------------ events
    def emit(self, event: str, **fields) -> None:
        if not self.dist.is_main:  # rank 0 alone writes the run folder and reports
            return
        rec = {"event": event, "time": round(time.time(), 3), **fields}
        with open(self.out / "progress.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.on_event:
            self.on_event(rec)

    # ------------------------------------------------------------------------------ set-up
    def setup(self):
        """Device, seeds, network, method, optimiser and batch source; ``run`` calls it (and ``semiseg bench``,
        which times single steps)."""
        cfg = self.cfg
        self.dist, device_name = D.setup(cfg.device)
        self.device = select_device(device_name)
        D.check_divisible(self.dist, cfg.labeled_batch,
                          get_method(cfg.method).trained_unlabeled_batch(cfg.unlabeled_batch))
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed, cfg.deterministic)  # identical on every rank: identical initial weights
        data = self.data
        method_cls = get_method(cfg.method)
        if method_cls.uses_unlabeled and not data.unlabeled:
            raise SemiSegError(f"method '{cfg.method}' needs unlabeled images but {cfg.data} has none "
                               "(add unlabeled volumes or use --method supervised)")
        cfg.selection = selection_fallback(cfg.selection, bool(data.val))  # said in the config and events
        if cfg.selection == "test" and not data.test:
            raise SemiSegError("--selection test needs a test split (--test-split PATH)")
        # selection=test exists only to reproduce papers that select on their test set (LA); it is labelled so
        self.val_refs = data.test if cfg.selection == "test" else data.val
        num_classes = len(data.classes) + 1
        net_kwargs = {"in_channels": 1, "num_classes": num_classes}
        if cfg.upsampling:
            net_kwargs["upsampling"] = cfg.upsampling
        net = build_network(cfg.network, **net_kwargs)
        if getattr(net, "dim", cfg.dim) != cfg.dim:
            raise SemiSegError(f"network '{cfg.network}' is {net.dim}D but the run is {cfg.dim}D")
        ctx = MethodContext(dim=cfg.dim, num_classes=num_classes, iterations=cfg.iterations, preset=cfg.preset,
                            patch_size=tuple(cfg.patch_size), labeled_batch=cfg.labeled_batch,
                            unlabeled_batch=cfg.unlabeled_batch)
        self.method = method_cls(net, method_cls.Options(**cfg.method_options), ctx).to(self.device)
        if method_cls.uses_teacher:
            teacher = copy.deepcopy(self.method.student)
            for p in teacher.parameters():
                p.requires_grad_(False)
            self.method.teacher = teacher
        self.warm_start = None
        self.ema_offset = 0  # EMA decay's step offset: a warm start continues the source's (no fast start)
        if cfg.init_from:
            source = finetune.source_checkpoint(cfg.init_from)
            finetune.check_out_dir(source, self.out)
            finetune.check_classes(source, data.classes)
            finetune.check_something_new(source, [r.name for r in data.labeled])
            teacher_from = finetune.warm_start(self.method, source)
            self.warm_start = {**finetune.describe(cfg, source), "teacher": teacher_from}
            self.ema_offset = int(source.get("iteration") or 0)
        self.method.train()
        # after the build: the decision needs the largest parameter tensor (machine.keep_freed_memory)
        keep_freed_memory(cfg.keep_freed_memory,
                          max((p.numel() * p.element_size() for p in self.method.parameters()), default=0))
        # the channels-last layout of networks and batches; None: as built
        self.memory_format = channels_last_format(cfg.dim, self.device) if cfg.channels_last else None
        if self.memory_format is not None:
            self.method.to(memory_format=self.memory_format)
        self.method.student = D.convert_sync_bn(self.method.student, self.dist, self.device, cfg.sync_bn)
        if cfg.compile:  # in place (nn.Module.compile): state_dict keys stay plain, checkpoints unchanged
            check_compiler(self.device)
            self.method.student.compile()
        params = [p for p in self.method.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        # the loop calls the method as a module (forward = losses) so DDP can reduce its gradients
        self.model = D.wrap(self.method, self.dist, self.device,
                            cfg.find_unused_parameters or getattr(method_cls, "ddp_find_unused_parameters", False))
        if self.dist.enabled and self.dist.rank > 0:
            torch.manual_seed(cfg.seed + self.dist.rank)  # weights are set: per-rank dropout/noise from here on
        # batch sizes are global: every rank draws the same global batch and trains on its contiguous slice
        src_kw = {"rank": self.dist.rank, "world_size": self.dist.world_size} if self.dist.enabled else {}
        self.source = BatchSource(data.labeled, data.unlabeled if method_cls.uses_unlabeled else [], cfg.dim,
                                  tuple(cfg.patch_size), data.normalization, cfg.labeled_batch,
                                  method_cls.trained_unlabeled_batch(cfg.unlabeled_batch), cfg.seed, self.device,
                                  method_cls.extra_unlabeled_streams, data_on_device=cfg.data_on_device,
                                  foreground_share=cfg.foreground_share, prefetch=cfg.prefetch, **src_kw)
        self.meta = {
            "dim": cfg.dim, "patch_size": list(cfg.patch_size), "stride": list(cfg.stride or cfg.patch_size),
            "resize": cfg.resize, "normalization": data.normalization, "lcc": cfg.lcc,
            "window_weighting": cfg.window_weighting, "tta": cfg.tta,
            "classes": [c.to_dict() for c in data.classes], "method": cfg.method, "dataset": data.kind,
            "plan": getattr(data, "plan", None),  # semiseg.planning: segment applies the same preprocessing
            "labeled_cases": [r.name for r in data.labeled],  # a warm start from this model must add some
        }
        self.amp_dtype = resolve_precision(cfg.precision, cfg.amp, self.device)
        self.budget = None
        if cfg.time_budget:
            if self.dist.enabled:
                raise SemiSegError("--time-budget works in one process (not under torchrun)")
            self.budget = TimeBudget(parse_duration(cfg.time_budget), cfg.iterations, cfg.val_every, cfg.lr_step,
                                     schedule_options(method_cls, self.method.options), clock=self.clock)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def _model_payload(self, step: int, metrics: dict) -> dict:
        net = self.method.inference_network()
        payload = {"network": dict(net.config), "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                   "meta": self.meta, "config": self.cfg.to_dict(), "iteration": step, "metrics": metrics}
        if self.method.teacher is not None:  # the EMA teacher of this very model (teacher-disagreement, warm start)
            payload["teacher"] = {k: v.detach().cpu() for k, v in self.method.teacher.state_dict().items()}
        return payload

    def _rng_state(self) -> dict:
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}

    def _save_last(self, step: int) -> None:
        """Every rank calls this (it gathers each rank's random state); rank 0 writes."""
        rank_rng = D.gather_objects(self._rng_state(), self.dist) if self.dist.enabled else None
        if not self.dist.is_main:
            return
        payload = self._model_payload(step, {"best_val_dice": self.best, "best_iteration": self.best_step})
        payload["training"] = {
            "method": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "source": self.source.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "step": step, "best": self.best, "best_step": self.best_step, "elapsed": self.elapsed,
            "rank_rng": rank_rng, "world_size": self.dist.world_size,
        }
        if self.budget is not None:
            payload["training"]["budget"] = self.budget.state_dict()
        save_checkpoint(self.out / "last.pt", payload)
        self.emit("checkpoint", kind="last", iteration=step, path=str(self.out / "last.pt"))

    def _resume(self) -> int:
        path = self.out / "last.pt"
        if not path.is_file():
            raise SemiSegError(f"--resume: no checkpoint to resume from in {self.out}")
        ckpt = load_checkpoint(path, map_location=self.device)
        tr = ckpt.get("training")
        if tr is None:
            raise SemiSegError(f"{path} holds no training state")
        if ckpt["config"].get("method") != self.cfg.method:
            raise SemiSegError(f"{path} was trained with method '{ckpt['config'].get('method')}', not '{self.cfg.method}'")
        self.method.load_state_dict(tr["method"])
        self.optimizer.load_state_dict(tr["optimizer"])
        self.scaler.load_state_dict(tr["scaler"])
        self.source.load_state_dict(tr["source"])
        torch.set_rng_state(tr["torch_rng"].cpu())
        if tr.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in tr["cuda_rng"]])
        rank_rng = tr.get("rank_rng")
        if self.dist.enabled and rank_rng and len(rank_rng) == self.dist.world_size:
            mine = rank_rng[self.dist.rank]
            torch.set_rng_state(mine["torch"].cpu())
            if mine.get("cuda") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"].cpu(), self.device)
        self.best, self.best_step, self.elapsed = tr["best"], tr["best_step"], tr.get("elapsed", 0.0)
        if self.budget is not None and tr.get("budget"):
            self.budget.load_state_dict(tr["budget"])  # the rest of the run's budget, not a new one
        return int(tr["step"])

    # ------------------------------------------------------------------------------ validation
    def _validate(self, step: int) -> float:
        net = self.method.inference_network()
        res = evaluate_cases(net, self.val_refs, self.meta, full=False, empty=self.cfg.empty,
                             half=self.amp_dtype is not None)
        s = summarize(res)
        dice = s["mean"]["dice"]
        improved = dice > self.best
        self.validated_at = step
        if improved:
            self.best = dice
            if self.cfg.selection in ("val", "test"):
                self.best_step = step
                save_checkpoint(self.out / "best.pt", self._model_payload(step, {"val_dice": dice}))
        self.emit("validation", iteration=step, split="test" if self.cfg.selection == "test" else "val",
                  dice=dice, best=improved, best_dice=self.best,
                  dice_per_class={k: v["dice"] for k, v in s["per_class"].items()})
        return dice

    def _validation_due(self, done: int, start: int) -> bool:
        """The references validate at multiples of the cadence. A budget re-plans its cadence as it goes, and a
        multiple of a cadence that just grew can fall on the very next iteration: budgeted runs count from the
        last validation instead."""
        if self.budget is None:
            return done % self.cfg.val_every == 0
        return done - max(self.validated_at, start) >= self.cfg.val_every

    def _plan_budget(self, done: int, at_end: bool = False) -> None:
        """Fit the rest of the schedule into the time budget (train/budget.py) and record it. At the planned
        end (its model just validated) the run goes on only for iterations worth another end validation: they
        must train at least ``TAIL_TRAINING_PER_VALIDATION`` times as long as that validation takes."""
        plan = self.budget.plan(done)
        more = plan.iterations - done
        if at_end and (more < 1 or more * plan.seconds_per_iteration
                       < TAIL_TRAINING_PER_VALIDATION * plan.validation_seconds):
            return
        apply_plan(self, plan)
        if self.dist.is_main:
            atomic_write(self.out / "config.json", json.dumps(self.cfg.to_dict(), indent=2))
        self.emit("budget", iteration=done, iterations=plan.iterations, val_every=self.cfg.val_every,
                  seconds_per_iteration=round(plan.seconds_per_iteration, 4),
                  validation_s=round(plan.validation_seconds, 2), remaining_s=round(self.budget.remaining(), 1),
                  schedule={"lr_step": plan.lr_step, **plan.options})

    # ------------------------------------------------------------------------------ one step
    def next_batch(self):
        """This rank's part of the next global batch."""
        return self.source.next()

    def train_step(self, batch, step: int) -> tuple[dict[str, torch.Tensor], float]:
        """One optimisation step (learning rate, forward under autocast, backward, optimiser, EMA).
        Returns the loss terms (device tensors, not read back) and the learning rate."""
        cfg = self.cfg
        lr = learning_rate(step, cfg.lr, cfg.lr_schedule, cfg.iterations, cfg.lr_step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        if self.memory_format is not None:
            batch = _channels_last(batch, self.memory_format)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            terms = self.model(batch, step)
        loss = terms["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.method.teacher is not None:  # on every rank: identical weights stay identical
            ema_update(self.method.teacher, self.method.student, ema_decay(step + self.ema_offset, cfg.ema_decay))
        return terms, lr

    # ------------------------------------------------------------------------------ main
    def run(self, resume: bool = False) -> dict:
        try:
            return self._run(resume)
        finally:
            self.close()

    def close(self) -> None:
        """Release what ``setup`` started (the batch source's prefetch thread, the process group) and the run
        folder's lock taken by :func:`semiseg.run.prepare_run`."""
        if getattr(self, "source", None) is not None:
            self.source.close()
        D.teardown(self.dist)
        runlock.release(self.out)

    def _run(self, resume: bool) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        self.setup()
        cfg = self.cfg
        main = self.dist.is_main
        self.best, self.best_step, self.elapsed = -1.0, -1, 0.0
        self.validated_at = -1
        self.train_seconds = 0.0  # time in training steps only (no validation, no checkpoints)
        start = self._resume() if resume else 0
        if main:
            if not resume:
                (self.out / "progress.jsonl").unlink(missing_ok=True)
            atomic_write(self.out / "config.json", json.dumps(cfg.to_dict(), indent=2))
        extra = {"world_size": self.dist.world_size} if self.dist.enabled else {}
        if self.budget is not None:
            self.budget.begin(start)
            extra["time_budget_s"] = self.budget.seconds
        if self.warm_start is not None:
            extra["warm_start"] = self.warm_start
        self.emit("started", iteration=start, iterations=cfg.iterations, method=cfg.method, device=str(self.device),
                  data=self.data.summary(), selection=cfg.selection, run_dir=str(self.out),
                  precision=str(self.amp_dtype or torch.float32).replace("torch.", ""), **extra)
        self.method.on_start(lambda message: self.emit("log", level="info", message=str(message)))
        sums: dict[str, torch.Tensor] = {}
        n_acc, t_window, last_logged = 0, time.perf_counter(), start
        t_start = time.perf_counter() - self.elapsed
        step = start
        stop_requested = False  # several ranks: agreed at log boundaries, so every rank stops at the same step
        deadline = False
        try:
            while step < cfg.iterations:  # a time budget may shorten cfg.iterations on the way
                if self.budget is not None and self.budget.out_of_time():
                    deadline = True  # stop here; the run ends normally (final checkpoint, evaluation)
                    cfg.iterations = step
                    break
                if self.dist.enabled:
                    stop_now = stop_requested
                else:
                    stop_now = self.should_stop()
                if stop_now:
                    self.elapsed = time.perf_counter() - t_start
                    self._save_last(step)
                    self.emit("finished", status="cancelled", iteration=step)
                    raise CancelledError(f"training cancelled at iteration {step}; resume with --resume")
                batch = self.next_batch()
                terms, lr = self.train_step(batch, step)
                for k, v in terms.items():  # accumulate on device: no host sync per iteration
                    v = v.detach().float().to(self.device)  # a method may log a host scalar (a ramp's weight)
                    sums[k] = sums[k] + v if k in sums else v
                n_acc += 1
                done = step = step + 1
                if self.budget is not None and self.budget.step_done(done):
                    self._plan_budget(done)
                if done % cfg.log_every == 0 or done == cfg.iterations:
                    flag = float(self.should_stop()) if self.dist.enabled else 0.0
                    reduced, stops = D.all_reduce_mean(sums, self.dist, flag)  # the one host read of the window
                    stop_requested = stop_requested or stops > 0
                    means = {k: v / n_acc for k, v in reduced.items()}
                    if not math.isfinite(means["loss"]):
                        raise SemiSegError(f"the loss became {means['loss']} between iterations {last_logged} and {done}; "
                                           f"last good checkpoint: {self.out / 'last.pt'} (try a lower --lr)")
                    now = time.perf_counter()
                    self.train_seconds += now - t_window
                    ips = (done - last_logged) / max(now - t_window, 1e-9)
                    left = {"remaining_s": round(self.budget.remaining(), 1)} if self.budget is not None else {}
                    self.emit("iteration", iteration=done, iterations=cfg.iterations, lr=lr, it_per_s=round(ips, 3),
                              eta_s=round((cfg.iterations - done) / max(ips, 1e-9), 1), **left,
                              **{k: round(v, 6) for k, v in means.items()})
                    sums, n_acc, last_logged = {}, 0, done
                    t_window = now
                last_of_budget = self.budget is not None and done == cfg.iterations  # the budget's final model
                if (cfg.val_every and self.val_refs and done >= cfg.val_from
                        and (last_of_budget or self._validation_due(done, start))):
                    t0, c0 = time.perf_counter(), self.clock()
                    if main:  # rank 0 validates; the others wait (no duplicated validation work)
                        self._validate(done)
                    D.barrier(self.dist)
                    t_window += time.perf_counter() - t0  # validation time is not training speed
                    if self.budget is not None:
                        self.budget.note_pause(self.clock() - c0, validation=True)
                        if self.budget.after_validation():
                            self._plan_budget(done, at_end=last_of_budget)
                if done % cfg.checkpoint_every == 0 and done != cfg.iterations:
                    self.elapsed = time.perf_counter() - t_start
                    c0 = self.clock()
                    self._save_last(done)
                    if self.budget is not None:
                        self.budget.note_pause(self.clock() - c0)
        except torch.OutOfMemoryError:
            raise SemiSegError(f"out of GPU memory at iteration {step} (patch {tuple(cfg.patch_size)}, batch "
                               f"{cfg.labeled_batch}+{cfg.unlabeled_batch}); lower --patch-size or the batch sizes; "
                               f"last checkpoint kept in {self.out}") from None
        if deadline and cfg.val_every and self.val_refs and main and self.validated_at != step:
            self._validate(step)  # the model the deadline stopped at (its time was kept back)
        self.elapsed = time.perf_counter() - t_start
        self._save_last(cfg.iterations)
        if main and (cfg.selection == "final" or self.best_step < 0):
            save_checkpoint(self.out / "best.pt", self._model_payload(cfg.iterations, {}))
            self.best_step = cfg.iterations
        summary = {
            "method": cfg.method, "data": self.data.summary(), "iterations": cfg.iterations,
            "selection": cfg.selection, "selected_iteration": self.best_step,
            "protocol": protocol_label(cfg.protocol, cfg.selection),
            "best_val_dice": self.best if self.best >= 0 else None,
            "wall_time_s": round(self.elapsed, 2),
            "it_per_s": round((cfg.iterations - start) / max(self.train_seconds, 1e-9), 3),
            "peak_memory_mb": round(peak_memory_mb(self.device), 1), "device": str(self.device),
            "labeled_cases": len(self.data.labeled),
        }
        if self.warm_start is not None:
            summary["warm_start"] = self.warm_start
        if self.dist.enabled:
            summary["world_size"] = self.dist.world_size
        if self.budget is not None:
            summary.update(time_budget_s=self.budget.seconds, stopped_at_deadline=deadline,
                           budget_elapsed_s=round(self.budget.elapsed(), 1))
        if not main:  # the final evaluation and metrics.json are rank 0's
            D.barrier(self.dist)
            summary["rank"] = self.dist.rank
            return summary
        if self.data.val:
            final = self._final_eval(self.data.val)
            summary["val"] = final
        if self.data.test:
            summary["test"] = self._final_eval(self.data.test)
        atomic_write(self.out / "metrics.json", json.dumps(summary, indent=2))
        brief = {k: ({kk: vv for kk, vv in v.items() if kk != "cases_detail"} if isinstance(v, dict) else v)
                 for k, v in summary.items()}
        self.emit("finished", status="completed", iteration=cfg.iterations, metrics=brief,
                  outputs={"best": str(self.out / "best.pt"), "last": str(self.out / "last.pt")})
        D.barrier(self.dist)
        return summary

    def _final_eval(self, refs) -> dict:
        from ..checkpoint import network_from_checkpoint
        ckpt = load_checkpoint(self.out / "best.pt")
        net = network_from_checkpoint(ckpt, self.device)
        res = evaluate_cases(net, refs, self.meta, full=True, empty=self.cfg.empty, half=self.amp_dtype is not None)
        return {**summarize(res), "cases_detail": {r.case: r.per_class for r in res}}


