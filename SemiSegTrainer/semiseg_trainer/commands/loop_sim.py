"""``semiseg loop-sim``: the label-correct-retrain loop simulated on a fully labeled dataset."""
from __future__ import annotations

from pathlib import Path

from .. import protocol
from ..options import parse_method_sets, split_args

LOOP_SIM_OWN = ("data", "labeled", "iterations", "seed", "init_from", "finetune_fraction")  # set by the simulation


def cmd_loop_sim(ns, reporter) -> int:
    """Start from 1 labeled training scan; each round suggest PER_ROUND scans, reveal their ground truth,
    warm-start a new version (and, for comparison, train from scratch for the same total iterations);
    validation Dice per round, per strategy, over seeds. A scan is a volume (ACDC: a patient frame, its
    slices together). Example: semiseg loop-sim --data phantom:10
    --strategies entropy,random --seeds 3 --rounds 3 --out sim/"""
    from semiseg.config import resolve_config
    from semiseg.loop_sim import format_table, simulate_strategies
    common = {k: v for k, v in split_args(ns).items() if k not in LOOP_SIM_OWN}
    method = resolve_config({**common, "data": ns.data}).method
    options = parse_method_sets(ns.set, [method]).get(method)
    if options:
        common["method_options"] = options
    strategies = [s for s in ns.strategies.replace(" ", "").split(",") if s]
    out = Path(ns.out)

    def print_rows(strategy: str, seed: int, rows: list[dict]) -> None:
        print(f"{strategy} seed {seed}: " + ", ".join(f"round {r['round']} ({r['labeled']} labeled) "
                                                     f"{100 * r['dice_warm']:.2f}" for r in rows), flush=True)

    results = simulate_strategies(ns.data, strategies, [ns.seed + i for i in range(ns.seeds)], ns.rounds,
                                  ns.per_round, ns.iterations, ns.finetune_iterations, out, common,
                                  scratch=ns.scratch, scratch_all=ns.scratch_all,
                                  on_event=reporter if reporter.json else None,
                                  on_rows=None if reporter.json else print_rows)
    if reporter.json:
        reporter({"event": "loop_sim", "results": results, "path": str(out / "loop_sim.json")})
    else:
        print(format_table(results))
    return protocol.EXIT_OK
