"""Every method trains on a CUDA GPU through the one loop (logged terms reduced on the device, checkpoint,
evaluation). These tests need a GPU and are skipped without one (CI has none; run them on a GPU machine:
`pytest Testing/test_gpu.py`)."""
import json
import math

import pytest
import torch

from semiseg.config import resolve_config
from semiseg.methods import METHODS
from semiseg.run import load_run_data
from semiseg.train.loop import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TWO_D = {"data": "phantom:4", "labeled": 2, "patch_size": (64, 64), "labeled_batch": 2, "unlabeled_batch": 2}
THREE_D = {"data": "phantom:3", "labeled": 1, "dim": 3, "network": "vnet", "patch_size": (32, 32, 16),
           "labeled_batch": 1, "unlabeled_batch": 1}
RUN = {"iterations": 3, "val_every": 0, "log_every": 1, "checkpoint_every": 100, "device": "cuda" if torch.cuda.is_available() else "cpu"}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_on_cuda_and_logs_every_term(method, tmp_path):
    data = THREE_D if method == "caml" else TWO_D  # CAML's memory bank is written for volumes
    cfg = resolve_config({**data, **RUN, "method": method})
    summary = Trainer(cfg, tmp_path, load_run_data(cfg)).run()
    events = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    logged = [e for e in events if e["event"] == "iteration"]
    assert [e["iteration"] for e in logged] == [1, 2, 3]
    assert all(math.isfinite(v) for e in logged for v in e.values() if isinstance(v, float))
    assert 0.0 <= summary["val"]["mean"]["dice"] <= 1.0


def test_bench_profile_counts_host_synchronisations_on_cuda(tmp_path):
    """`semiseg bench --profile` on CUDA sorts by device time and counts the synchronising calls of the steps:
    a step that also reads one value back (`.item()`) counts exactly one more per step."""
    from semiseg.benchmark.profile import profile_steps

    cfg = resolve_config({**TWO_D, **RUN, "method": "supervised"})
    trainer = Trainer(cfg, tmp_path / "run", load_run_data(cfg))
    trainer.setup()
    try:
        plain = profile_steps(trainer, 0, tmp_path / "prof", "plain")
        step = trainer.train_step

        def step_and_read(batch, i):
            terms, lr = step(batch, i)
            terms["loss"].item()
            return terms, lr

        trainer.train_step = step_and_read
        reading = profile_steps(trainer, 0, tmp_path / "prof", "reading")
    finally:
        trainer.close()
    assert plain["clock"] == "device" and plain["self_ms_per_step"] > 0
    assert reading["host_syncs_per_step"] == plain["host_syncs_per_step"] + 1
