"""`semiseg benchmark` / `semiseg report`: aggregation against hand-computed values, a killed run resumed
and never counted twice, the protocol header naming exactly the options the runs used, valid PNG figures."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from semiseg import benchmark as B
from semiseg.config import resolve_config
from semiseg.run import load_run_data
from semiseg.errors import SemiSegError
from semiseg.evaluation import CaseResult, summarize
from semiseg.train.loop import Trainer

TINY = {"patch_size": (32, 32), "labeled_batch": 2, "unlabeled_batch": 2, "iterations": 6, "val_every": 3,
        "checkpoint_every": 3, "log_every": 1, "deterministic": True, "device": "cpu", "threads": 1}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ helpers
def fake_run(root: Path, explicit: dict, per_class_dice: dict, hd95: float, wall: float = 10.0) -> Path:
    """A finished run folder (config.json from the real resolver, metrics.json with known numbers):
    2 test cases, every case scoring ``per_class_dice`` per class, HD95 ``hd95``, ASD hd95/2."""
    cfg = resolve_config(explicit)
    d = root / B.run_name(cfg.method, cfg.labeled, cfg.seed)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    results = [CaseResult(f"case{i}", {c: {"dice": v, "jaccard": v / (2 - v), "hd95": hd95, "asd": hd95 / 2}
                                       for c, v in per_class_dice.items()}) for i in range(2)]
    metrics = {"method": cfg.method, "data": "phantom: fake", "iterations": cfg.iterations, "selection": "val",
               "selected_iteration": cfg.iterations, "wall_time_s": wall, "it_per_s": 2.0, "peak_memory_mb": 100.0,
               "device": "cpu", "test": {**summarize(results), "cases_detail": {r.case: r.per_class for r in results}}}
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def table_rows(md: str, section: str) -> tuple[list[str], list[list[str]]]:
    part = md.split(section, 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in part.splitlines() if ln.startswith("| ")]
    split = lambda ln: [c.strip() for c in ln.strip().strip("|").split("|")]  # noqa: E731
    return split(lines[0]), [split(ln) for ln in lines[2:]]


def option_names(md: str) -> list[str]:
    head = md.split("- Options that differ from the preset", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^  - `([^`]+)`", head, flags=re.M)


def png_size(path: Path) -> tuple[int, int]:
    b = path.read_bytes()
    assert b[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert b[12:16] == b"IHDR"
    return int.from_bytes(b[16:20], "big"), int.from_bytes(b[20:24], "big")


# ------------------------------------------------------------------------------------------ statistics
def test_mean_and_sample_std_by_hand():
    m, s = B.mean_std([0.80, 0.84, 0.86])
    assert m == pytest.approx((0.80 + 0.84 + 0.86) / 3)
    dev = [0.80 - m, 0.84 - m, 0.86 - m]
    assert s == pytest.approx(math.sqrt(sum(x * x for x in dev) / 2))        # ddof = 1 (sample std)
    assert s == pytest.approx(np.std([0.80, 0.84, 0.86], ddof=1))
    assert s != pytest.approx(np.std([0.80, 0.84, 0.86], ddof=0))
    assert B.mean_std([0.5]) == (0.5, None)                                   # one seed: no std
    assert B.format_mean_std([0.80, 0.84, 0.86], 100) == "83.33 ± 3.06"
    assert B.format_mean_std([0.7], 100) == "70.00"


def test_seeds_are_derived_deterministically():
    assert B.derive_seeds("3") == [1337, 1338, 1339]
    assert B.derive_seeds(2, base=7) == [7, 8]
    assert B.derive_seeds("1337,3407") == [1337, 3407]
    with pytest.raises(SemiSegError):
        B.derive_seeds("0")
    with pytest.raises(SemiSegError):
        B.derive_seeds("5,5")


# ------------------------------------------------------------------------------------------ aggregation
def test_report_aggregates_known_runs(tmp_path):
    base = {"data": "phantom:6", "labeled": 2, "iterations": 6}
    dice = {1337: 0.80, 1338: 0.84, 1339: 0.86}
    hd = {1337: 2.0, 1338: 4.0, 1339: 9.0}
    for seed, d in dice.items():
        fake_run(tmp_path / "runs", dict(base, method="mean_teacher", seed=seed),
                 {"RV": d - 0.1, "Myo": d, "LV": d + 0.1}, hd[seed], wall=10.0 * (seed - 1336))
    fake_run(tmp_path / "runs", dict(base, method="supervised", seed=1337), {"RV": 0.6, "Myo": 0.7, "LV": 0.8}, 3.0)
    records = B.collect_runs([tmp_path / "runs", tmp_path / "runs" / "supervised-L2-s1337"])  # named twice: once
    assert len(records) == 4
    info = B.write_report(records, tmp_path / "out", plots=False)
    md = (tmp_path / "out" / "results.md").read_text()
    head, rows = table_rows(md, "## Results on `test`")
    mt = dict(zip(head, next(r for r in rows if r[1] == "mean_teacher")))
    sup = dict(zip(head, next(r for r in rows if r[1] == "supervised")))
    assert mt["n"] == "3" and sup["n"] == "1"
    # Dice: mean 83.333, sample std sqrt(((-3.333)^2 + 0.667^2 + 2.667^2) / 2) = 3.055
    assert mt["Dice %"] == "83.33 ± 3.06"
    assert mt["RV Dice %"] == "73.33 ± 3.06" and mt["LV Dice %"] == "93.33 ± 3.06"
    # HD95 2, 4, 9: mean 5, sample std sqrt((9 + 1 + 16) / 2) = sqrt(13) = 3.606 (population std would be 4.16)
    assert mt["HD95"] == "5.00 ± 3.61" and mt["ASD"] == "2.50 ± 1.80"
    jac = [v / (2 - v) for v in (0.7, 0.74, 0.76)] + [v / (2 - v) for v in (0.8, 0.84, 0.86)] + \
          [v / (2 - v) for v in (0.9, 0.94, 0.96)]
    per_run_jac = [np.mean(jac[i::3]) * 100 for i in range(3)]
    assert mt["Jaccard %"] == f"{np.mean(per_run_jac):.2f} ± {np.std(per_run_jac, ddof=1):.2f}"
    assert mt["wall time s"] == "20.0 ± 10.0"                     # 10, 20, 30
    assert sup["Dice %"] == "70.00"                               # one seed: no ± at all
    _, seed_rows = table_rows(md, "## Per seed on `test`")
    assert sorted((r[1], r[2]) for r in seed_rows) == [("mean_teacher", "1337"), ("mean_teacher", "1338"),
                                                       ("mean_teacher", "1339"), ("supervised", "1337")]
    # results.csv: one row per run and case, the case's mean over classes
    import csv
    with open(tmp_path / "out" / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert info["rows"] == len(csv_rows) == 4 * 2
    r = next(r for r in csv_rows if r["method"] == "mean_teacher" and r["seed"] == "1338" and r["case"] == "case1")
    assert float(r["mean_dice"]) == pytest.approx(0.84) and float(r["RV_dice"]) == pytest.approx(0.74)
    assert r["split"] == "test"


def test_duplicate_seed_is_an_error_not_a_second_count(tmp_path):
    base = {"data": "phantom:6", "labeled": 2, "method": "supervised", "seed": 1337}
    fake_run(tmp_path / "a", base, {"RV": 0.5}, 1.0)
    fake_run(tmp_path / "b", base, {"RV": 0.6}, 1.0)
    with pytest.raises(SemiSegError, match="seed 1337"):
        B.collect_runs([tmp_path / "a", tmp_path / "b"])


# ------------------------------------------------------------------------------------------ protocol header
def test_header_states_exactly_the_options_used(tmp_path):
    def header(name: str, extra: dict, mopts: dict | None = None) -> tuple[str, list[str]]:
        for seed in (1337, 1338):
            e = dict(data="phantom:6", labeled=2, method="mean_teacher", seed=seed, **extra)
            if mopts:
                e["method_options"] = mopts
            fake_run(tmp_path / name, e, {"RV": 0.5, "LV": 0.6}, 1.0)
        md = B.results_markdown(B.collect_runs([tmp_path / name]))
        return md, option_names(md)

    # budgets past the preset's first validation (100): a shorter run would report the final checkpoint
    md, names = header("a", {"iterations": 200, "patch_size": (32, 32)})
    assert names == ["iterations", "patch_size"]           # seed and labeled are grid axes, not options
    assert "- `iterations` = 200 (preset: 600)" in md and "- `patch_size` = 32×32 (preset: 96×96)" in md
    md, names = header("b", {"iterations": 400, "patch_size": (32, 32)})
    assert names == ["iterations", "patch_size"] and "- `iterations` = 400 (preset: 600)" in md
    md, names = header("c", {"iterations": 400, "patch_size": (32, 32), "lr": 0.02, "lcc": True})
    assert names == ["iterations", "lcc", "lr", "patch_size"]
    assert "- `lr` = 0.02 (preset: 0.03)" in md and "largest connected component per class on" in md
    md, names = header("d", {"iterations": 400}, {"consistency": 0.5})
    assert names == ["iterations", "mean_teacher"]
    assert "- `mean_teacher` option `consistency` = 0.5 (method default for the preset: 0.1)" in md
    md, names = header("e", {})
    assert names == [] and "every run used the preset's recipe" in md
    for line in ("Checkpoint selection: best mean validation Dice (`selection=val`), checked every 100 iterations",
                 "Empty-prediction rule: `zero`", "Split evaluated: `test` (2 volumes)", "Seeds: 1337, 1338",
                 "sample standard deviation (ddof = 1)", "Versions: python", "Hardware: CPU"):
        assert line in md, line


# ------------------------------------------------------------------------------------------ grid: kill and resume
class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """Two runs of a tiny phantom grid: seed 1337 finished, seed 1338 killed at iteration 5 (last
    checkpoint at 3, iterations 4 and 5 already logged), as a SIGKILL leaves it."""
    out = tmp_path_factory.mktemp("bench")
    specs = B.plan_grid("phantom:6", ["supervised"], [2], B.derive_seeds(2), out, TINY)
    done, killed = specs
    run_cfg = resolve_config(done.explicit)
    Trainer(run_cfg, done.dir, load_run_data(run_cfg)).run()
    polls = {"n": 0}

    def kill():
        polls["n"] += 1
        if polls["n"] == 6:  # the start of iteration 5
            raise Killed()
        return False

    with pytest.raises(Killed):
        run_cfg = resolve_config(killed.explicit)
        Trainer(run_cfg, killed.dir, load_run_data(run_cfg), should_stop=kill).run()
    return out, specs


def test_killed_run_is_resumed_and_not_counted_twice(grid):
    out, (done, killed) = grid
    assert B.run_state(done) == "done" and B.run_state(killed) == "resume"
    before = (done.dir / "metrics.json").read_bytes(), (done.dir / "progress.jsonl").read_bytes()
    # the real command: each run in its own process, then the tables
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "SemiSegLib"), str(ROOT / "SemiSegTrainer")]))
    args = ["benchmark", "--data", "phantom:6", "--methods", "supervised", "--labeled", "2", "--seeds", "2",
            "--no-plots", "--out", str(out), "--patch-size", "32", "32", "--deterministic"]
    for k in ("labeled_batch", "unlabeled_batch", "iterations", "val_every", "checkpoint_every", "log_every",
              "device", "threads"):
        args += ["--" + k.replace("_", "-"), str(TINY[k])]
    p = subprocess.run([sys.executable, "-m", "semiseg_trainer", "--json", *args], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    events = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    logs = [e["message"] for e in events if e["event"] == "log" and "run " in e.get("message", "")]
    assert "finished earlier, kept" in logs[0] and "resuming" in logs[1]
    assert [e.get("run") for e in events if e["event"] == "started"] == [killed.name]
    report = next(e for e in events if e["event"] == "report")
    assert report["runs"] == 2 and Path(report["results_md"]) == out / "results.md"
    assert ((done.dir / "metrics.json").read_bytes(), (done.dir / "progress.jsonl").read_bytes()) == before
    raw = [json.loads(line) for line in (killed.dir / "progress.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in raw if e["event"] == "started"] == [0, 3]
    assert [e["status"] for e in raw if e["event"] == "finished"] == ["completed"]
    logged = [e["iteration"] for e in raw if e["event"] == "iteration"]
    assert logged.count(4) == 2 and logged.count(5) == 2           # the killed attempt logged past its checkpoint
    from semiseg.plots import read_progress
    assert [it for it, _ in read_progress(killed.dir)["iterations"]] == [1, 2, 3, 4, 5, 6]   # counted once
    assert json.loads((killed.dir / "metrics.json").read_text())["iterations"] == 6
    records = B.collect_runs([out])
    assert sorted(r.seed for r in records) == [1337, 1338]
    _, rows = table_rows((out / "results.md").read_text(), "## Results on")
    assert [r[2] for r in rows] == ["2"]                            # n = 2 seeds, not 3
    events = []
    B.run_grid([done, killed], on_event=events.append, isolate=False, plots=False)  # nothing left to train
    assert [e["event"] for e in events] == ["log", "log"] and all("kept" in e["message"] for e in events)
    changed = B.plan_grid("phantom:6", ["supervised"], [2], [1337], out, dict(TINY, iterations=8))
    with pytest.raises(SemiSegError, match="different configuration"):
        B.run_state(changed[0])


# ------------------------------------------------------------------------------------------ figures
def test_figures_are_pngs_of_the_expected_size(grid, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    from semiseg import plots
    out, (done, _) = grid
    made = B.make_run_figures(done.dir)
    assert [p.name for p in made] == ["curves.png", "qualitative.png"]
    assert png_size(done.dir / "curves.png") == (1200, 400)
    q = done.dir / "qualitative.png"
    assert png_size(q) == (1200, 400)
    plots.plot_overlay([("a", "supervised", done.dir), ("b", "mean_teacher", done.dir)], tmp_path / "o.png")
    assert png_size(tmp_path / "o.png") == (1200, 450)
    # the ground-truth contours are drawn in the classes' colours (phantom myocardium: 0.30, 0.70, 0.35)
    img = imread(q)[..., :3]
    near = np.abs(img - np.array([0.30, 0.70, 0.35])).max(-1) < 0.03
    assert near.sum() > 100
    with pytest.raises(SemiSegError):
        plots.plot_run_curves(tmp_path, tmp_path / "none.png")     # no progress.jsonl: an error, no file
    assert not (tmp_path / "none.png").exists()


def test_tensorboard_is_optional(grid):
    out, (done, _) = grid
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        have = True
    except Exception:  # noqa: BLE001
        have = False
    tb = B.export_tensorboard(done.dir)
    if have:
        assert tb is not None and any(tb.iterdir())
    else:
        assert tb is None and not (done.dir / "tensorboard").exists()


def test_method_options_for_the_grid():
    from semiseg_trainer.cli import parse_method_sets
    methods = ["supervised", "mean_teacher", "ua_mt"]
    sets = parse_method_sets(["consistency_delay=0", "ua_mt.mc_passes=2", "mean_teacher.noise-std=0.05"], methods)
    assert sets == {"mean_teacher": {"consistency_delay": 0, "noise_std": 0.05},
                    "ua_mt": {"consistency_delay": 0, "mc_passes": 2}}
    for bad in (["supervised.consistency=1"], ["nothing=1"], ["ua_mt.mc_passes=two"], ["caml.x=1"], ["novalue"]):
        with pytest.raises(SemiSegError):
            parse_method_sets(bad, methods)


def test_grid_matched_baseline_is_the_methods_run_without_its_unlabeled_terms(tmp_path):
    from semiseg.config import matched_supervised
    from semiseg_trainer.cli import parse_method_sets
    methods = ["supervised", "supervised@unimatch", "unimatch"]
    # supervised@X takes X's options: its baseline is derived from X's run as configured
    sets = parse_method_sets(["dice=multiclass", "unimatch.conf_thresh=0.9"], methods)
    assert sets["supervised@unimatch"] == {"dice": "multiclass"}
    specs = B.plan_grid("phantom:6", methods, [1], [1337], tmp_path, TINY, sets)
    plain, matched, method = (resolve_config(s.explicit) for s in specs)
    assert specs[1].dir.name == "supervised@unimatch-L1-s1337" and matched.method == "supervised"
    assert matched.to_dict() == matched_supervised(method).to_dict()
    assert (plain.resize, matched.resize) == ("nearest", "bilinear")
    assert plain.upsampling == matched.upsampling == method.upsampling == "bilinear"
    assert matched.method_options == {"sup_loss": "half_ce_dice", "dice": "multiclass"}
    # in the table the two supervised runs are two variants, told apart by what differs from the preset
    for spec, dice in ((specs[0], 0.5), (specs[1], 0.6)):
        fake_run(tmp_path / spec.dir.name, spec.explicit, {"RV": dice, "LV": dice}, 1.0)
    labels = [g.label for g in B.group_runs(B.collect_runs([tmp_path]))]
    assert len(labels) == 2 and all(label.startswith("supervised [") for label in labels)
    matched_label = [label for label in labels if "resize=bilinear" in label]
    assert len(matched_label) == 1 and "upsampling" not in matched_label[0]  # the same network as the preset's


def test_header_names_the_protocol(tmp_path):
    """Honest runs say "SemiSeg protocol (val-selected)"; runs made with --protocol paper that selected on the
    test set say "paper protocol (test-selected)" and the cadence they validated at."""
    for seed in (1337, 1338):
        fake_run(tmp_path / "honest", dict(data="phantom:6", labeled=2, method="mean_teacher", seed=seed), {"RV": 0.5}, 1.0)
        d = fake_run(tmp_path / "paper", dict(data="phantom:6", labeled=2, method="mean_teacher", seed=seed,
                                              selection="test", val_every=200, val_from=400), {"RV": 0.5}, 1.0)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(dict(cfg, protocol="paper")))  # as --protocol paper on LA writes it
    honest = B.results_markdown(B.collect_runs([tmp_path / "honest"]))
    paper = B.results_markdown(B.collect_runs([tmp_path / "paper"]))
    assert "- Protocol: SemiSeg protocol (val-selected)" in honest and "paper protocol" not in honest
    assert "- Protocol: paper protocol (test-selected)" in paper
    assert "checked every 200 iterations from iteration 400" in paper


def test_a_run_another_benchmark_is_training_is_refused_before_anything_is_written_there(tmp_path):
    """A second benchmark over the same folder while the first trains a run (its lock held by a live process):
    one line naming the owner, and nothing of the second one's (run record, stderr log) in that run's folder."""
    import socket
    spec, = B.plan_grid("phantom:6", ["supervised"], [2], [1337], tmp_path, dict(TINY))
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        spec.dir.mkdir(parents=True)
        (spec.dir / ".semiseg.lock").write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname(),
                                                             "time": 0}))
        with pytest.raises(SemiSegError, match=f"is in use by process {owner.pid} on host"):
            B.run_grid([spec], isolate=True, plots=False)
        assert sorted(p.name for p in spec.dir.iterdir()) == [".semiseg.lock"]
    finally:
        owner.kill()
        owner.wait()


def test_parallel_runs_overlap_and_compute_what_one_at_a_time_computes(tmp_path):
    """`semiseg benchmark --parallel 2`: both runs are training at once (each started before either finished),
    each gets half of the CPU threads, and each run's losses and test metrics are those of the same run trained
    alone with that thread count."""
    share = max(1, (os.cpu_count() or 1) // 2)
    tiny = {k: v for k, v in TINY.items() if k != "threads"}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "SemiSegLib"), str(ROOT / "SemiSegTrainer")]))
    args = ["benchmark", "--data", "phantom:6", "--methods", "supervised,mean_teacher", "--labeled", "2",
            "--seeds", "1", "--no-plots", "--parallel", "2", "--out", str(tmp_path / "par"),
            "--patch-size", "32", "32", "--deterministic"]
    for k in ("labeled_batch", "unlabeled_batch", "iterations", "val_every", "checkpoint_every", "log_every", "device"):
        args += ["--" + k.replace("_", "-"), str(TINY[k])]
    p = subprocess.run([sys.executable, "-m", "semiseg_trainer", "--json", *args], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    events = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    order = [(e["event"], e["run"]) for e in events if e["event"] in ("started", "finished")]
    assert sorted(order[:2]) == [("started", "mean_teacher-L2-s1337"), ("started", "supervised-L2-s1337")], order

    serial = B.plan_grid("phantom:6", ["supervised", "mean_teacher"], [2], [1337], tmp_path / "ser",
                         dict(tiny, threads=share))
    B.run_grid(serial, isolate=False, plots=False)
    for spec in serial:
        par = tmp_path / "par" / "runs" / spec.name
        assert json.loads((par / "config.json").read_text())["threads"] == share
        losses = [[e["loss"] for e in map(json.loads, (d / "progress.jsonl").read_text().splitlines())
                   if e["event"] == "iteration"] for d in (par, spec.dir)]
        assert len(losses[0]) == TINY["iterations"] and losses[0] == losses[1]
        test = [json.loads((d / "metrics.json").read_text())["test"]["mean"] for d in (par, spec.dir)]
        assert test[0] == test[1]
