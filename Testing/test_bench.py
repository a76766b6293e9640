"""`semiseg bench`: the JSON holds the promised measurements with sane relations, warm-up steps are not
measured, and the table lists every method (tiny phantom configuration, CPU)."""
import json

from semiseg.benchmark.speed import bench_method
from semiseg.run import load_run_data
from semiseg.config import resolve_config
from semiseg.machine import native_bf16
from semiseg_trainer.cli import main

TINY = ["--data", "phantom:6", "--labeled", "2", "--patch-size", "32", "32", "--labeled-batch", "2",
        "--unlabeled-batch", "2", "--device", "cpu", "--threads", "1", "--inference-volumes", "1"]


def test_bench_json_and_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["--no-json", "bench", "--method", "supervised,mean_teacher", "--iterations", "3", "--warmup", "2",
               *TINY, "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    table = text[text.index("method"):]
    lines = table.splitlines()
    assert lines[2].split()[0] == "supervised" and lines[3].split()[0] == "mean_teacher"
    doc = json.loads(out.read_text())
    assert "bench" in doc["command"] and [r["method"] for r in doc["results"]] == ["supervised", "mean_teacher"]
    for r in doc["results"]:
        assert r["iterations"] == 3 and r["warmup"] == 2  # the measured count excludes the warm-up
        assert r["it_per_s"] > 0 and r["seconds"] > 0
        assert abs(r["it_per_s"] * r["seconds"] - 3) < 0.05 * 3  # it/s is measured steps over measured time
        assert 0 <= r["data_share"] <= 1 and 0 <= r["data_seconds"] <= r["seconds"]
        assert r["memory_kind"] in ("cpu_peak_rss_reset", "cpu_peak_rss_lifetime") and r["peak_memory_mb"] > 0
        if r["memory_kind"] == "cpu_peak_rss_reset":
            assert 0 <= r["peak_growth_mb"] <= r["peak_memory_mb"]
        assert r["inference_volumes"] == 1 and r["inference_s_per_volume"] > 0
        assert r["offset"] == resolve_config({"data": "phantom:6", "method": r["method"]}).iterations // 2
    sup, mt = doc["results"]
    auto = "bfloat16" if native_bf16() else "float32"  # precision auto on this CPU
    assert sup["unlabeled_batch"] == 0 and mt["unlabeled_batch"] == 2 and sup["precision"] == auto
    assert sup["channels_last"] is True and sup["machine"]["native_bf16"] == native_bf16()
    assert f"settings: precision {auto}, channels-last on" in table  # the table names the machine and settings
    assert any(line.startswith("machine: ") for line in lines)


def test_bench_runs_the_training_step(tmp_path):
    """bench calls the Trainer's own training step (no second copy), warmup + iterations times, at the
    iteration numbers offset, offset + 1, ...; --inference-volumes 0 skips inference."""
    cfg = resolve_config({"data": "phantom:6", "labeled": 2, "patch_size": (32, 32), "labeled_batch": 2,
                          "method": "supervised", "device": "cpu", "threads": 1, "deterministic": True})
    seen = []
    from semiseg.train import loop
    orig = loop.Trainer.train_step

    def spy(self, batch, step):
        seen.append(step)
        return orig(self, batch, step)

    loop.Trainer.train_step = spy
    try:
        r = bench_method(cfg, warmup=1, iterations=2, inference_volumes=0, offset=7, data=load_run_data(cfg))
    finally:
        loop.Trainer.train_step = orig
    assert seen == [7, 8, 9] and r["iterations"] == 2 and r["inference_s_per_volume"] is None
    assert r["final_loss"] > 0


def test_bench_profile_counts_each_convolution_once_per_step(tmp_path, capsys):
    """--profile: a supervised step runs every convolution of the UNet once forward and once backward, so the
    profile's calls per step of those operators equal the network's count of convolution modules; the ops are
    ordered by self time, their shares add up to 1, the Chrome trace holds every call of the profiled steps,
    and the profiled steps come after the measured ones (iteration numbers)."""
    import torch

    from semiseg.benchmark.profile import PROFILED_STEPS
    from semiseg.networks import build_network

    prof = tmp_path / "prof"
    rc = main(["--no-json", "bench", "--method", "supervised", "--iterations", "2", "--warmup", "1", *TINY,
               "--out", str(tmp_path / "bench.json"), "--profile", str(prof)])
    assert rc == 0
    text = capsys.readouterr().out
    (r,) = json.loads((tmp_path / "bench.json").read_text())["results"]
    p = r["profile"]
    assert p["steps"] == PROFILED_STEPS and p["clock"] == "cpu" and p["host_syncs_per_step"] is None
    net = build_network("unet", in_channels=1, num_classes=4, upsampling=r["upsampling"])
    convs = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) for m in net.modules())
    calls = {op["name"]: op["calls_per_step"] for op in p["ops"]}
    assert calls["aten::convolution"] == convs and calls["aten::convolution_backward"] == convs
    times = [op["self_ms_per_step"] for op in p["ops"]]
    assert times == sorted(times, reverse=True)
    assert abs(sum(op["share"] for op in p["ops"]) - 1) < 1e-6
    assert abs(sum(times) - p["self_ms_per_step"]) < 1e-6 * max(p["self_ms_per_step"], 1)
    events = json.loads((prof / "supervised.trace.json").read_text())["traceEvents"]
    assert sum(e.get("name") == "aten::convolution" for e in events) == convs * PROFILED_STEPS
    assert "profile supervised: " in text and "aten::convolution_backward" in text


def test_bench_keeps_earlier_rows_when_a_later_method_cannot_run(tmp_path, capsys, monkeypatch):
    """A method that stops in its pre-flight check (ICL's memory estimate, as in training) ends the bench with one
    error line, and the JSON written so far holds the methods measured before it."""
    from semiseg.methods import icl
    monkeypatch.setattr(icl, "available_bytes", lambda device: 10 ** 6)
    out = tmp_path / "bench.json"
    rc = main(["--no-json", "bench", "--method", "supervised,icl_lite", "--iterations", "1", "--warmup", "0",
               *TINY, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "icl_lite needs about" in err and "Traceback" not in err
    assert [r["method"] for r in json.loads(out.read_text())["results"]] == ["supervised"]
