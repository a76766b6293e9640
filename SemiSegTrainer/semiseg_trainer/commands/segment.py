"""What a trained model is used for: ``semiseg segment``, ``semiseg suggest`` and ``semiseg evaluate``."""
from __future__ import annotations

import json
from pathlib import Path

from .. import protocol
from ..console import format_table
from ..stop import StopFlag


def cmd_segment(ns, reporter) -> int:
    from semiseg.predict import Segmenter, expand_inputs, write_uncertainty_csv
    from semiseg.train.loop import select_device
    seg = Segmenter(ns.model, select_device(ns.device), lcc=ns.lcc, stride=tuple(ns.stride) if ns.stride else None,
                    tta=ns.tta)
    files = expand_inputs(ns.input)
    stop = StopFlag()
    results = []
    for i, f in enumerate(files):
        if stop():
            reporter({"event": "finished", "status": "cancelled", "done": i})
            return protocol.EXIT_CANCELLED
        r = seg.segment_file(f, ns.out, uncertainty=ns.uncertainty)
        results.append(r)
        reporter({"event": "predicted", "index": i + 1, "total": len(files), **r})
    if ns.uncertainty:
        write_uncertainty_csv(Path(ns.out) / "uncertainty.csv", results)
    reporter({"event": "finished", "status": "completed", "outputs": str(ns.out)})
    return protocol.EXIT_OK


def cmd_suggest(ns, reporter) -> int:
    """Rank unlabeled volumes by the model's uncertainty (the score is the mean voxel uncertainty over the
    predicted structures, dilated by one voxel, and every voxel at least 0.5 uncertain) and pick N of them,
    passing over near-duplicates of earlier picks. Example: semiseg suggest --model runs/v1 --input pool/ --n 3"""
    from semiseg.suggest import format_ranking, suggest_files
    from semiseg.train.loop import select_device
    ranking = suggest_files(ns.model, ns.input, ns.n, ns.strategy, ns.seed, ns.diversity, select_device(ns.device))
    if reporter.json:
        print(json.dumps({"strategy": ns.strategy, "ranking": ranking}), flush=True)
    else:
        print(format_ranking(ranking, ns.strategy))
    return protocol.EXIT_OK


def cmd_evaluate(ns, reporter) -> int:
    from semiseg.evaluation import evaluate_model
    s, out = evaluate_model(ns.model, ns.data, ns.split, labeled=ns.labeled or None, val_split=ns.val_split,
                            test_split=ns.test_split, empty=ns.empty, lcc=ns.lcc, tta=ns.tta, device=ns.device,
                            out=ns.out)
    if reporter.json:
        reporter({"event": "evaluated", **s})
    else:
        print(f"{ns.split}: {s['cases']} cases, empty-prediction convention '{ns.empty}', largest component {'on' if s['lcc'] else 'off'}, "
              f"test-time augmentation {s['tta']}")
        print(format_table(s))
        print(f"written: {out / f'evaluate_{ns.split}.json'}, {out / f'evaluate_{ns.split}.csv'}")
    return protocol.EXIT_OK
