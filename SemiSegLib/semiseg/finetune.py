"""Warm start (``semiseg train --init-from RUN``): a new model version trained from an earlier one after
the user corrected and added cases.

What carries over (:func:`warm_start`): the network's weights, and the EMA teacher when the source
checkpoint has one and the new method uses one (otherwise the teacher starts as a copy of the loaded
student). The optimiser state (SGD momentum) starts fresh: it belongs to the old data's gradients.

The ``finetune`` schedule (:func:`finetune_config`), applied when ``--iterations`` is not given:

* iterations = ``finetune_fraction`` (default 0.25) of the source run's iterations, at least 1; the
  learning rate follows the run's own schedule over these iterations (poly: from the base lr to 0);
* the method's iteration-valued ramps (``Method.schedule_options``: consistency ramp-up, delays) are 0
  unless given: the source model is past them, so the unlabeled terms keep their full weight instead of
  restarting from zero; the EMA decay continues after the source's iterations (no fast-start phase that
  would overwrite the loaded teacher with the student);
* validation at least 4 times in the run.

What the new run inherits from the source's configuration unless given (:data:`INHERITED`): the method, the
network and its input size, the batch sizes, the learning rate, the method's options (same method only),
and, for planned data, the source's plan (the new run preprocesses as the model was trained).

Refused with one line: a source whose classes differ from the new data's (both lists named), a run folder
that is the source's own (a retrain never overwrites the model it starts from), and a retrain with nothing
new (every labeled case of the new run was labeled in the source run).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .errors import SemiSegError

# TrainConfig fields taken from the source run when the new run does not set them
INHERITED = ("method", "dim", "network", "upsampling", "patch_size", "resize", "tta", "labeled_batch", "unlabeled_batch",
             "lr", "lr_schedule", "ema_decay")


def source_checkpoint(init_from: str | Path) -> dict:
    """The checkpoint ``--init-from`` names: a file, or a run folder's best.pt (the model its versions show)."""
    return load_checkpoint(init_from, map_location="cpu")


def inherited_values(source: dict, given: dict) -> dict:
    """The source run's settings the new run keeps unless ``given`` sets them (a layer below the config file)."""
    cfg = source.get("config", {})
    out = {k: cfg[k] for k in INHERITED if k in cfg and k not in given}
    method = given.get("method", cfg.get("method"))
    if method == cfg.get("method") and "method_options" in cfg:
        out["method_options"] = without_ramps(method, cfg["method_options"])
    return out


def without_ramps(method: str, options: dict) -> dict:
    """``options`` less ``method``'s iteration-valued ramps and delays (``Method.schedule_options``): a warm
    start is past them."""
    from .methods import get_method
    ramps = getattr(get_method(method), "schedule_options", ())
    return {k: v for k, v in options.items() if k not in ramps}


def finetune_config(cfg, given: dict, source: dict):
    """``cfg`` with the ``finetune`` schedule (module docstring) where ``given`` leaves it open."""
    from .methods import get_method
    src_iterations = int(source.get("config", {}).get("iterations") or source.get("iteration") or 1)
    if "iterations" not in given:
        cfg.iterations = max(1, round(src_iterations * cfg.finetune_fraction))
        if "val_every" not in given and cfg.val_every:
            cfg.val_every = max(1, min(cfg.val_every, cfg.iterations // 4))
        if "checkpoint_every" not in given:
            cfg.checkpoint_every = min(cfg.checkpoint_every, cfg.iterations)
    given_options = given.get("method_options") or {}
    opts = dict(cfg.method_options)
    for k in getattr(get_method(cfg.method), "schedule_options", ()):
        if k in opts and k not in given_options:
            opts[k] = 0
    cfg.method_options = opts
    return cfg


def check_out_dir(source: dict, out_dir: str | Path) -> None:
    src = Path(source["path"]).resolve().parent
    if Path(out_dir).resolve() == src:
        raise SemiSegError(f"--init-from {source['path']} is in the run folder {out_dir}: a retrain never "
                           "overwrites the model it starts from; give a new --out")


def check_classes(source: dict, classes) -> None:
    src = [(c["value"], c["name"]) for c in source["meta"]["classes"]]
    new = [(c.value, c.name) for c in classes]
    if [(v, n.lower()) for v, n in src] != [(v, n.lower()) for v, n in new]:
        show = lambda cs: ", ".join(f"{v}={n}" for v, n in cs)  # noqa: E731
        raise SemiSegError(f"model {source['path']} was trained on classes [{show(src)}] but the new labeled data "
                           f"have [{show(new)}]: correct the segment names/values or train without --init-from")


def check_something_new(source: dict, labeled_names: list[str]) -> None:
    before = source["meta"].get("labeled_cases")
    if before is not None and set(labeled_names) <= set(before):
        raise SemiSegError(f"nothing new to learn: the {len(labeled_names)} labeled case(s) were all labeled when "
                           f"{source['path']} was trained; add a corrected case, or train without --init-from")


def warm_start(method, source: dict) -> str:
    """Load the source's weights into ``method``'s student (and teacher); returns how the teacher started."""
    net = method.inference_network()
    if dict(source["network"]) != dict(net.config):
        raise SemiSegError(f"model {source['path']} is a {source['network']} network; this run builds "
                           f"{dict(net.config)}: give the same --network/--patch-size/--upsampling")
    net.load_state_dict(source["model"])
    if method.teacher is None:
        return "none"
    state = source.get("teacher")
    if state is None:
        state, how = net.state_dict(), "copy of the loaded student"
    else:
        how = "loaded EMA teacher"
    with torch.no_grad():
        method.teacher.load_state_dict(state)
    return how


def describe(cfg, source: dict) -> dict:
    """What the run records about its warm start (config.json has ``init_from``; metrics.json this)."""
    return {"init_from": source["path"], "source_iterations": source.get("iteration"),
            "finetune_iterations": cfg.iterations,
            "source_labeled_cases": len(source["meta"].get("labeled_cases") or []) or None}


__all__ = ["INHERITED", "check_classes", "check_out_dir", "check_something_new", "describe", "finetune_config",
           "inherited_values", "source_checkpoint", "warm_start", "without_ramps"]