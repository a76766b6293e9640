"""The method interface. A method is a small module over the shared training loop: it owns its
networks' extra parts and its losses; the loop owns optimisation, EMA, AMP, checkpoints, logging.

To add a method: one file in this folder with a ``Method`` subclass decorated with
``@register_method("name")``, an ``Options`` dataclass (every hyper-parameter, paper defaults,
``metadata={"help": ...}``), optional per-preset option values in ``option_presets`` and training
recipe changes in ``recipe``. Nothing in the loop changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..data.pipeline import Batch
from .reference import Reference


@dataclass
class MethodContext:
    """What a method may know about the run."""
    dim: int                 # 2 or 3
    num_classes: int         # including background
    iterations: int          # total training iterations
    preset: str              # acdc, la, phantom
    patch_size: tuple = ()   # the training size (2D resize target or 3D patch); () = unknown (unit tests)
    labeled_batch: int = 0   # samples per step (0 = unknown)
    unlabeled_batch: int = 0


@dataclass
class NoOptions:
    pass


class Method(nn.Module):
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    # option values that differ per preset (dataset recipe), e.g. {"la": {"rampup_iterations": 6000}}
    option_presets: ClassVar[dict[str, dict]] = {}
    # training-recipe fields (TrainConfig) that differ per preset for this method
    recipe: ClassVar[dict[str, dict]] = {}
    # what the method's authors ran (paper, code, runs, protocol, declared differences): ``reference.py``
    reference: ClassVar["Reference | None"] = None
    uses_teacher: ClassVar[bool] = False     # the loop builds and EMA-updates ``self.teacher``
    uses_unlabeled: ClassVar[bool] = True    # False: batches carry no unlabeled stream
    extra_unlabeled_streams: ClassVar[int] = 0  # more independent unlabeled batches (UniMatch's "mix" stream)
    # options counted in iterations: a time budget that shortens the run scales them with it (train/budget.py)
    schedule_options: ClassVar[tuple[str, ...]] = ("rampup_iterations", "consistency_delay")
    # a training step's cost in image forward passes per batch sample (a backward ~ 2 forwards): Mean Teacher's
    # student forward+backward on every sample and teacher forward on the unlabeled half = 3.5; the short-budget
    # planner's speed estimate (planning/budget_recipe.py)
    step_cost: ClassVar[float] = 3.5

    @classmethod
    def trained_unlabeled_batch(cls, unlabeled_batch: int) -> int:
        """The unlabeled batch a step draws: 0 for a method without an unlabeled stream, whatever is set."""
        return unlabeled_batch if cls.uses_unlabeled else 0

    def __init__(self, student: nn.Module, options, ctx: MethodContext):
        super().__init__()
        self.student = student
        self.options = options
        self.ctx = ctx
        self.teacher: nn.Module | None = None

    def ramp_length(self, rampup_iterations: int) -> int:
        """A ramp-up never outlasts the run: capped to its iterations. The literature's ramps span their
        whole run (SSL4MIS ACDC 30000 of 30000, UA-MT LA 6000 of 6000); a shorter run (a user's own data,
        a CPU budget) still reaches the full weight, at its end, instead of staying near zero."""
        return min(rampup_iterations, self.ctx.iterations) if self.ctx.iterations > 0 else rampup_iterations

    def losses(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """Return the loss terms of one step; key ``loss`` is the total that is optimised.
        Other entries (detached or not) are logged."""
        raise NotImplementedError

    def forward(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """``losses`` as the module's forward, so the loop can call the method through a
        DistributedDataParallel wrapper (which reduces the gradients of what forward used)."""
        return self.losses(batch, step)

    def on_start(self, log) -> None:
        """Called once before the first iteration with ``log(message)`` (e.g. a memory estimate).
        Raise ``SemiSegError`` here when the run cannot work (it will not fit, say)."""

    @classmethod
    def baseline_supervised_loss(cls, options: dict, dim: int) -> dict:
        """The ``supervised`` options whose loss equals this method's labeled term, for a baseline that
        differs from the method only in the unlabeled terms (:func:`semiseg.config.matched_supervised`)."""
        return {k: options[k] for k in ("sup_loss", "dice") if k in options}

    def inference_network(self) -> nn.Module:
        """The plain network saved for ``semiseg segment`` (training-only parts excluded)."""
        return self.student

    @classmethod
    def default_options(cls, preset: str, dim: int):
        values = dict(cls.option_presets.get(preset, {}))
        values.update(cls.option_presets.get(f"{dim}d", {}) if preset not in cls.option_presets else {})
        return cls.Options(**values)

    @classmethod
    def configure_options(cls, options: dict, cfg) -> dict:
        """Fill option values that depend on the resolved run configuration ``cfg`` (a ``TrainConfig``:
        label count, patch size, batch sizes) once every layer is merged. Default: unchanged."""
        return options
