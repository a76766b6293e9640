"""SemiSeg engine: semi-supervised medical image segmentation.

The public API (imported on first use, so ``import semiseg.errors`` stays free of torch)::

    from semiseg import prepare_run, Trainer, Segmenter
    cfg, data, plan = prepare_run({"data": "phantom", "method": "mean_teacher", "iterations": 200})
    Trainer(cfg, "runs/mt", data).run()
    Segmenter("runs/mt").segment_file("scan.nrrd", "out/")

Where things are: :mod:`semiseg.run` assembles a run (configuration + data + plan); :mod:`semiseg.config`
holds every option (``TrainConfig``) and :mod:`semiseg.presets` the dataset recipes; :mod:`semiseg.train.loop`
is the one training loop; :mod:`semiseg.methods` one file per method; :mod:`semiseg.data` reading and sampling
data; :mod:`semiseg.planning` the plan for users' own scans; :mod:`semiseg.predict` segmentation of files;
:mod:`semiseg.benchmark` the multi-run benchmark and the speed benchmark.
"""
from __future__ import annotations

import importlib

_API = {
    "prepare_run": "semiseg.run", "load_run_data": "semiseg.run",
    "TrainConfig": "semiseg.config", "resolve_config": "semiseg.config", "load_config_file": "semiseg.config",
    "PRESETS": "semiseg.presets", "LITERATURE_DATASETS": "semiseg.presets",
    "Trainer": "semiseg.train.loop", "select_device": "semiseg.train.loop",
    "Segmenter": "semiseg.predict",
    "DataSplits": "semiseg.data.datasets", "load_dataset": "semiseg.data.datasets",
    "METHODS": "semiseg.methods", "get_method": "semiseg.methods", "Method": "semiseg.methods",
    "Plan": "semiseg.planning",
    "SemiSegError": "semiseg.errors", "CancelledError": "semiseg.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'semiseg' has no attribute '{name}'")


def __dir__():
    return sorted(list(globals()) + list(_API))
