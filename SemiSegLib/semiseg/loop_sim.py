"""``semiseg loop-sim``: the label-correct-retrain loop simulated on a fully labeled dataset.

Round 0 trains from scratch on one labeled training scan (the others are the unlabeled pool). Each round
then asks the current model for ``per_round`` scans (:func:`semiseg.suggest.suggest`), reveals their ground
truth (standing in for the user's corrected segmentation), and warm-starts a new version from the current
one (``init_from``, ``finetune_iterations``). Beside it, the *scratch* arm trains a fresh model on the same
labeled set for the warm chain's total iterations so far (equal total training), so warm start is compared
with retraining from scratch at equal cost. Validation Dice (the run's selected checkpoint, mean over
classes) is recorded per round; every run folder is kept under ``OUT/STRATEGY/seedS/``.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Callable

import numpy as np

from .atomic import atomic_write
from .data.datasets import CaseRef, DataSplits, load_dataset
from .data.volume import Volume
from .errors import SemiSegError


def _scans(full: DataSplits) -> dict[str, list[CaseRef]]:
    """The training cases grouped by the scan they belong to, in the dataset's order: the unit a user labels.
    A case that is a whole scan is its own group; ACDC's 2D slices group into their patient frame."""
    groups: dict[str, list[CaseRef]] = {}
    for r in full.labeled:
        groups.setdefault(r.scan_name, []).append(r)
    return groups


def _slice_index(name: str) -> int:
    digits = re.search(r"(\d+)$", name)
    return int(digits.group(1)) if digits else 0


def _scan_image(refs: list[CaseRef]) -> Callable[[], Volume]:
    """A scan's image loader: the case's own, or its 2D slices stacked along z in slice-number order."""
    if len(refs) == 1 and not refs[0].scan:
        return refs[0].image_loader

    def load() -> Volume:
        slices = [r.image() for r in sorted(refs, key=lambda r: _slice_index(r.name))]
        if any(s.array.ndim != 2 for s in slices):
            raise SemiSegError(f"scan {refs[0].scan_name}: its cases are not 2D slices")
        return Volume(np.stack([s.array for s in slices], axis=-1), slices[0].geometry, refs[0].scan_name,
                      spacing_known=slices[0].spacing_known)
    return load


def _splits(full: DataSplits, labeled: list[str]) -> DataSplits:
    """``full`` (every training case labeled) with only the cases of the ``labeled`` scans keeping their label;
    the rest unlabeled."""
    lab = [r for r in full.labeled if r.scan_name in labeled]
    pool = [dataclasses.replace(r, label_loader=None) for r in full.labeled if r.scan_name not in labeled]
    return dataclasses.replace(full, labeled=lab, unlabeled=pool,
                               description=f"{len(labeled)} labeled scans ({len(lab)} cases) + {len(pool)} "
                                           f"unlabeled cases (loop simulation)")


def _train(explicit: dict, data: DataSplits, out: Path, on_event) -> float:
    from .run import prepare_run
    from .train.loop import Trainer
    cfg, data, _ = prepare_run(explicit, None, out, data=data)
    summary = Trainer(cfg, out, data=data, on_event=on_event).run()
    return float(summary.get("best_val_dice") or summary.get("val", {}).get("mean", {}).get("dice", 0.0))


def _past_ramps(explicit: dict) -> dict:
    """``explicit`` without the method's iteration-valued ramps and delays: a warm-started round starts past
    them (the ``finetune`` schedule sets them to 0), whatever the runs from scratch were given."""
    options = explicit.get("method_options")
    if not options:
        return explicit
    from .config import resolve_config
    from .finetune import without_ramps
    return {**explicit, "method_options": without_ramps(resolve_config(explicit).method, options)}


def simulate(data: str, strategy: str, seed: int, rounds: int, per_round: int, iterations: int,
             finetune_iterations: int, out: str | Path, common: dict | None = None, scratch: bool = True,
             initial: Path | None = None, on_event: Callable[[dict], None] | None = None) -> list[dict]:
    """One strategy, one seed: a row per round {round, labeled, picked, dice_warm, dice_scratch, iterations}.
    ``initial``: a round-0 model to share between strategies of the same seed (trained here when None)."""
    from .predict import Segmenter
    from .suggest import suggest
    out = Path(out)
    common = dict(common or {})
    probe = load_dataset(data)
    full = load_dataset(data, len(probe.labeled) + len(probe.unlabeled))  # every training case labeled: the truth
    scans = _scans(full)
    if len(scans) < 1 + rounds * per_round:
        raise SemiSegError(f"{data} has {len(scans)} training scans: too few for {rounds} rounds of "
                           f"{per_round} after the first")
    labeled = [next(iter(scans))]
    base = {**common, "data": data, "seed": seed}
    model = initial or out / "round0"
    if initial is None:
        _train({**base, "iterations": iterations}, _splits(full, labeled), model, on_event)
    dice0 = json.loads((Path(model) / "metrics.json").read_text())
    rows = [{"round": 0, "labeled": 1, "picked": [], "iterations": iterations,
             "dice_warm": dice0.get("best_val_dice") or dice0["val"]["mean"]["dice"], "dice_scratch": None}]
    total = iterations
    for k in range(1, rounds + 1):
        seg = Segmenter(model, "cpu")
        pool = [(name, _scan_image(refs)) for name, refs in scans.items() if name not in labeled]
        ranking = suggest(seg, pool, per_round, strategy, seed + k)
        picked = [r["input"] for r in ranking if r["picked"]]
        labeled = labeled + picked
        total += finetune_iterations
        warm_dir = out / f"round{k}"
        warm = _train({**_past_ramps(base), "init_from": str(model), "iterations": finetune_iterations},
                      _splits(full, labeled), warm_dir, on_event)
        row = {"round": k, "labeled": len(labeled), "picked": picked, "iterations": total, "dice_warm": warm,
               "dice_scratch": None}
        if scratch:
            row["dice_scratch"] = _train({**base, "iterations": total}, _splits(full, labeled),
                                         out / f"round{k}_scratch", on_event)
        rows.append(row)
        model = warm_dir
    atomic_write(out / "rounds.json", json.dumps(rows, indent=2))
    return rows


def simulate_strategies(data: str, strategies: list[str], seeds: list[int], rounds: int, per_round: int,
                        iterations: int, finetune_iterations: int, out: str | Path, common: dict | None = None,
                        scratch: bool = True, scratch_all: bool = False,
                        on_event: Callable[[dict], None] | None = None,
                        on_rows: Callable[[str, int, list[dict]], None] | None = None) -> dict[str, list[list[dict]]]:
    """Every strategy at every seed (runs under ``OUT/STRATEGY/seedS/``): the strategies of a seed share its
    round-0 model, and the scratch arm runs for the first strategy of each seed (for every one with
    ``scratch_all``). ``on_rows(strategy, seed, rows)`` after each simulation. Writes ``OUT/loop_sim.json``
    (strategy -> per seed -> rows) and ``OUT/loop_sim.md`` (:func:`format_table`); returns the former."""
    out = Path(out)
    results: dict[str, list] = {s: [] for s in strategies}
    for seed in seeds:
        initial = None
        for s in strategies:
            d = out / s / f"seed{seed}"
            rows = simulate(data, s, seed, rounds, per_round, iterations, finetune_iterations, d, common,
                            scratch=(scratch and initial is None) or scratch_all, initial=initial, on_event=on_event)
            initial = initial or d / "round0"  # the strategies of a seed share its round-0 model
            results[s].append(rows)
            if on_rows:
                on_rows(s, seed, rows)
    atomic_write(out / "loop_sim.json", json.dumps(results, indent=2))
    atomic_write(out / "loop_sim.md", format_table(results) + "\n")
    return results


def format_table(results: dict[str, list[list[dict]]]) -> str:
    """Mean validation Dice per round over seeds, per strategy (warm and scratch arms)."""
    lines = [f"{'strategy':<12}{'round':>6}{'labeled':>8}{'warm Dice':>11}{'scratch Dice':>14}  per seed (warm)"]
    for strategy, per_seed in results.items():
        for k in range(len(per_seed[0])):
            rows = [s[k] for s in per_seed]
            warm = [r["dice_warm"] for r in rows]
            scr = [r["dice_scratch"] for r in rows if r["dice_scratch"] is not None]
            lines.append(f"{strategy:<12}{k:>6}{rows[0]['labeled']:>8}{100 * sum(warm) / len(warm):>11.2f}"
                         f"{(100 * sum(scr) / len(scr)) if scr else float('nan'):>14.2f}  "
                         + " ".join(f"{100 * w:.2f}" for w in warm))
    return "\n".join(lines)
