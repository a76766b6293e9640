"""The short-budget recipe: given a budget and a machine description, the planner's choice of training size,
batch and validation cadence is the hand-computed one; a GPU or a recipe that fits keeps the recipe; fields the
user sets win over it, and prepare_run reports it."""
import pytest

from semiseg import machine
from semiseg.planning.budget_recipe import estimated_seconds_per_iteration, short_budget_recipe
from semiseg.run import prepare_run

CPU_BF16 = {"threads": 2, "native_bf16": True, "gpu": ""}
ACDC = dict(dim=2, patch_size=(256, 256), labeled_batch=12, unlabeled_batch=12, iterations=30000, val_every=200)


def test_speed_model_by_hand():
    # 3.5 forward passes x 24 samples x 256² pixels at 1.78e6 pixel-passes/s per core on 2 cores
    assert estimated_seconds_per_iteration((256, 256), 12, 12, 3.5, 2, True) == pytest.approx(
        3.5 * 24 * 65536 / 3.56e6)
    assert estimated_seconds_per_iteration((256, 256), 12, 12, 3.5, 2, False) == pytest.approx(
        2 * 3.5 * 24 * 65536 / 3.56e6)  # fp32 at half the rate
    # 3D voxels at their own rate: 3.0e6 (bf16) and 1.35e6 (fp32) per core
    assert estimated_seconds_per_iteration((112, 112, 80), 2, 2, 3.5, 2, True) == pytest.approx(
        3.5 * 4 * 112 * 112 * 80 / 6.0e6)
    assert estimated_seconds_per_iteration((112, 112, 80), 2, 2, 3.5, 2, False) == pytest.approx(
        3.5 * 4 * 112 * 112 * 80 / 2.7e6)


@pytest.mark.parametrize("step_cost,machine_desc,expected", [
    # Mean Teacher, 30 min, 2 bf16 cores: 256² 12+12 affords 1047 iterations (1.55 s), 6+6 2095; 192² 1862, 3725;
    # 128² 12+12 4190, 6+6 8381; 128² 4+4 (two samples per core) affords 12571 >= 10000 (0.129 s)
    (3.5, CPU_BF16, ((128, 128), 4, 4, 12571)),
    # UA-MT (7.5): nothing affords 10000; the cheapest candidate, 128² 4+4: 5866
    (7.5, CPU_BF16, ((128, 128), 4, 4, 5866)),
    # the same CPU without native bf16 computes at half the rate: Mean Teacher's cheapest, 6285
    (3.5, {**CPU_BF16, "native_bf16": False}, ((128, 128), 4, 4, 6285)),
    # 8 cores: the batch is halved to one sample per core at most (8+8); 256² 12+12 4190, 8+8 6285, 192² 12+12
    # 7449, 192² 8+8 11174
    (3.5, {**CPU_BF16, "threads": 8}, ((192, 192), 8, 8, 11174)),
])
def test_short_budget_recipe_for_acdc_in_30_minutes(step_cost, machine_desc, expected):
    r = short_budget_recipe(1800, machine_desc, step_cost=step_cost, **ACDC)
    assert (r.patch_size, r.labeled_batch, r.unlabeled_batch, r.iterations_affordable) == expected
    assert r.val_every == 3000  # about 10 validations over the run (the budget scales the cadence with it)
    # a 2D recipe predicts with logits upsampled bilinearly to the slice, averaged over its reflections
    assert r.config_values() == {"patch_size": expected[0], "labeled_batch": expected[1],
                                 "unlabeled_batch": expected[2], "val_every": 3000, "resize": "bilinear",
                                 "tta": "reflections", "lr_schedule": "poly"}
    assert r.describe().startswith("short-budget recipe: %dx%d, batch %d+%d, bilinear inference resize, "
                                   "test-time reflections" % (*expected[0], *expected[1:3]))


def test_supervised_takes_the_first_candidate_that_affords_the_target():
    # 256² 12 2444, 6 4888; 192² 12 4345, 6 8690; 128² 12 9777, 6 19555 >= 10000
    r = short_budget_recipe(1800, CPU_BF16, step_cost=3.0, **{**ACDC, "unlabeled_batch": 0})
    assert (r.patch_size, r.labeled_batch, r.unlabeled_batch, r.iterations_affordable) == ((128, 128), 6, 0, 19555)


def test_a_size_or_batch_the_user_sets_is_kept_and_the_rest_chosen_around_it():
    # batch 12+12 set: 256², 192², 128² at 12+12 afford 1047, 1862, 4190 (< 10000): the cheapest, 128² 12+12
    r = short_budget_recipe(1800, CPU_BF16, step_cost=3.5, fixed={"labeled_batch": 12, "unlabeled_batch": 12},
                            **ACDC)
    assert (r.patch_size, r.labeled_batch, r.unlabeled_batch, r.iterations_affordable) == ((128, 128), 12, 12, 4190)
    # size 160² set: 12+12 affords 2682, 6+6 5364, 4+4 8045: the cheapest
    r = short_budget_recipe(1800, CPU_BF16, step_cost=3.5, fixed={"patch_size": (160, 160)}, **ACDC)
    assert (r.patch_size, r.labeled_batch, r.unlabeled_batch, r.iterations_affordable) == ((160, 160), 4, 4, 8045)


def test_nothing_fits_gives_the_cheapest_candidate():
    r = short_budget_recipe(60, CPU_BF16, step_cost=3.5, **ACDC)
    assert (r.patch_size, r.labeled_batch, r.unlabeled_batch) == ((128, 128), 4, 4)  # 2D: never below 4+4 here
    assert "do not fit" in r.reason


def test_a_gpu_or_a_recipe_that_fits_is_kept():
    assert short_budget_recipe(1800, {**CPU_BF16, "gpu": "NVIDIA H100"}, step_cost=3.5, **ACDC) is None
    assert short_budget_recipe(36 * 3600, CPU_BF16, step_cost=3.5, **ACDC) is None  # 36 h: 30000 iterations fit
    # the phantom recipe (96², 4+4, 600 iterations) fits 30 minutes
    assert short_budget_recipe(1800, CPU_BF16, 2, (96, 96), 4, 4, 600, 100, 3.5) is None


def test_3d_patches_shrink_on_every_axis_to_multiples_of_16():
    # LA Mean Teacher (112x112x80, 2+2) at 3.0e6 voxel-passes/s per core on 2 bf16 cores: 2.34 s/it, 2767
    # iterations in 0.9 x 2 hours (< 3000); 80x80x64 (3/4, rounded down to 16s) 0.956 s/it, 6780
    r = short_budget_recipe(7200, CPU_BF16, 3, (112, 112, 80), 2, 2, 15000, 0, 3.5)
    assert (r.patch_size, r.labeled_batch, r.val_every, r.iterations_affordable) == ((80, 80, 64), 2, 0, 6780)
    assert r.recipe_iterations_affordable == 2767
    # in 30 minutes nothing affords 3000: the cheapest, 64^3 (the 3D floor; 1/2 would be 48x48x32), 2+2
    r30 = short_budget_recipe(1800, CPU_BF16, 3, (112, 112, 80), 2, 2, 15000, 0, 3.5)
    assert (r30.patch_size, r30.labeled_batch, r30.unlabeled_batch) == ((64, 64, 64), 2, 2)
    values = r.config_values()
    assert "resize" not in values  # 3D predicts by sliding window, at the training spacing
    assert "tta" not in values  # and once per window (5 passes would cost a 3D model too much)
    assert values["stride"] == (20, 20, 16)  # windows a quarter of the patch apart, not the recipe's 18x18x4
    assert values["lr_schedule"] == "poly"  # not the recipe's x0.1 every 2500 iterations, compressed


def test_prepare_run_applies_the_recipe_under_what_the_user_sets(monkeypatch):
    """phantom:6 (96², 4+4, 600 iterations) in 30 s on a described 2-core bf16 CPU: 4+4 affords 372 iterations
    (< 600: the budget is short); the recipe keeps 96² (the ladder's floor) and 4+4 (the 2D batch floor); the
    user's labeled batch 2 is kept (2+2: 744 iterations)."""
    monkeypatch.setattr(machine, "describe", lambda: {"native_bf16": True, "gpu": ""})
    told = []
    explicit = {"data": "phantom:6", "method": "mean_teacher", "device": "cpu", "threads": 2, "time_budget": "30s"}
    cfg, _, _ = prepare_run(explicit, on_recipe=told.append)
    assert (cfg.patch_size, cfg.labeled_batch, cfg.unlabeled_batch, cfg.val_every) == ((96, 96), 4, 4, 60)
    assert (cfg.resize, cfg.tta) == ("bilinear", "reflections")
    assert len(told) == 1 and told[0].startswith("short-budget recipe: 96x96, batch 4+4")
    told.clear()
    cfg, _, _ = prepare_run({**explicit, "labeled_batch": 2}, on_recipe=told.append)
    # the user's labeled batch is kept and the unlabeled one follows the recipe's ratio; the line tells that run
    assert (cfg.labeled_batch, cfg.unlabeled_batch) == (2, 2)
    assert told[0].startswith("short-budget recipe: 96x96, batch 2+2") and "about 744 iterations" in told[0]
    # a size the user sets that alone would fit the budget: the budget is still short for the recipe (96²), so
    # the recipe's inference and cadence apply around it (64² 4+4: 838 iterations)
    cfg, _, _ = prepare_run({**explicit, "patch_size": (64, 64)})
    assert (cfg.patch_size, cfg.labeled_batch, cfg.resize, cfg.tta, cfg.val_every) == ((64, 64), 4, "bilinear",
                                                                                       "reflections", 60)
    cfg, _, _ = prepare_run({k: v for k, v in explicit.items() if k != "time_budget"})
    assert (cfg.labeled_batch, cfg.unlabeled_batch, cfg.val_every) == (4, 4, 100)  # no budget: the recipe
    assert (cfg.resize, cfg.tta) == ("nearest", "none")  # Mean Teacher's reference inference (SSL4MIS)
    cfg, _, _ = prepare_run({**explicit, "resize": "nearest", "tta": "none"})
    assert (cfg.resize, cfg.tta) == ("nearest", "none")  # the user's choice wins over the recipe's


def test_supervised_is_neither_charged_nor_given_an_unlabeled_batch(monkeypatch):
    """Supervised (3.0 passes per sample) on phantom:6 (96², labeled batch 4) in 10 s on a described 2-core bf16
    CPU: only its 4 labeled samples cost, 3.0 x 4 x 96² / 3.56e6 = 0.0311 s, 289 iterations in 9 s (< 600: short);
    charging the recipe's 4 unlabeled samples too would halve that to 144. The line names one batch."""
    monkeypatch.setattr(machine, "describe", lambda: {"native_bf16": True, "gpu": ""})
    told = []
    cfg, _, _ = prepare_run({"data": "phantom:6", "method": "supervised", "device": "cpu", "threads": 2,
                             "time_budget": "10s"}, on_recipe=told.append)
    assert (cfg.patch_size, cfg.labeled_batch, cfg.unlabeled_batch) == ((96, 96), 4, 0)
    assert told[0].startswith("short-budget recipe: 96x96, batch 4, ") and "about 289 iterations" in told[0]


def test_a_users_folder_is_judged_on_its_plan_not_on_the_size_the_user_sets(tmp_path, monkeypatch):
    """A planned folder (3D, plan: 32x16x16, batch 2+2) with a 40 s budget on a described 2-core bf16 CPU: the
    plan's recipe affords 1883 iterations (< 3000), so the budget is short; the user's 16³ alone would afford 3766.
    With the user's 16³ the recipe still applies around it: windows a quarter patch apart (4³)."""
    from test_planning import write_cases
    monkeypatch.setattr(machine, "describe", lambda: {"native_bf16": True, "gpu": ""})
    base = (0.7, 0.9, 1.1)
    folder = write_cases(tmp_path / "scans", [base, tuple(s / 2 for s in base)], (20, 16, 12))
    explicit = {"data": str(folder), "method": "mean_teacher", "labeled": 1, "device": "cpu", "threads": 2,
                "cache_dir": str(tmp_path / "cache")}
    cfg, _, _ = prepare_run(explicit)
    assert (cfg.patch_size, cfg.labeled_batch, cfg.unlabeled_batch) == ((32, 16, 16), 2, 2)
    told = []
    cfg, _, _ = prepare_run({**explicit, "time_budget": "40s", "patch_size": (16, 16, 16)}, on_recipe=told.append)
    assert (cfg.patch_size, cfg.labeled_batch, cfg.unlabeled_batch, cfg.stride) == ((16, 16, 16), 2, 2, (4, 4, 4))
    assert told[0].startswith("short-budget recipe: 16x16x16, batch 2+2") and "about 3766 iterations" in told[0]
