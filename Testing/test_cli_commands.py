"""The ``semiseg`` parser and its dispatch: every sub-command has a body and every body a sub-command,
each sub-command's --help lists its options, and the options a command sets itself are not offered as
pass-through training options."""
import argparse
import functools

import pytest

from semiseg_trainer import cli

# per sub-command, options its --help must list (its own and, where it has them, pass-through ones)
OPTIONS = {
    "train": ["--out", "--config", "--resume", "--baseline", "--data", "--labeled", "--method", "--iterations",
              "--lr", "--time-budget", "--largest-component", "--consistency"],
    "segment": ["--model", "--input", "--out", "--device", "--largest-component", "--lcc", "--stride",
                "--uncertainty"],
    "suggest": ["--model", "--input", "--n", "--strategy", "--seed", "--diversity", "--device"],
    "loop-sim": ["--data", "--strategies", "--seeds", "--seed", "--rounds", "--per-round", "--iterations",
                 "--finetune-iterations", "--scratch", "--no-scratch", "--scratch-all", "--out", "--lr", "--set"],
    "evaluate": ["--model", "--data", "--split", "--labeled", "--val-split", "--test-split", "--empty",
                 "--largest-component", "--lcc", "--device", "--out"],
    "demo": ["--out", "--method", "--iterations", "--device", "--resume"],
    "plan": ["--out", "--preprocess", "--device", "--memory-budget-gb"],
    "methods": ["--deviations"],
    "run": ["--job"],
    "benchmark": ["--data", "--methods", "--labeled", "--seeds", "--seed", "--set", "--out", "--plots",
                  "--no-plots", "--iterations", "--lr"],
    "bench": ["--data", "--method", "--iterations", "--warmup", "--offset", "--inference-volumes", "--set",
              "--out", "--threads", "--profile"],
    "report": ["--out", "--plots"],
}
# options a command sets itself, so it must not offer them as training options
NOT_OFFERED = {"loop-sim": ["--init-from", "--finetune-fraction"], "plan": ["--lr", "--method"],
               "bench": ["--method-options"], "benchmark": ["--method"]}
EXAMPLES = {"train": "Example: semiseg train --data", "suggest": "Example: semiseg suggest --model runs/v1",
            "loop-sim": "Example: semiseg loop-sim --data phantom:10", "plan": "Example: semiseg plan my_scans/",
            "benchmark": "Example: semiseg benchmark --data", "bench": "Example: semiseg bench --data"}


@functools.lru_cache(maxsize=None)
def _parser(method: str) -> argparse.ArgumentParser:
    return cli.build_parser(method)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def test_every_sub_command_has_a_body_and_every_body_a_sub_command():
    assert set(_subcommands(_parser("mean_teacher"))) == set(cli.HANDLERS)


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_each_sub_command_lists_its_options(command):
    sub = _subcommands(_parser("mean_teacher"))[command]
    flags, text = _flags(sub), sub.format_help()
    missing = [f for f in OPTIONS[command] if f not in flags or f not in text]
    assert not missing, f"semiseg {command} --help lacks {missing}"
    assert not set(NOT_OFFERED.get(command, [])) & flags
    if command in EXAMPLES:  # the long description (the body's docstring), reflowed into one paragraph
        assert EXAMPLES[command] in " ".join(text.split())


def test_the_methods_options_follow_the_method_given():
    unimatch = _flags(_subcommands(_parser("unimatch"))["train"])
    mean_teacher = _flags(_subcommands(_parser("mean_teacher"))["train"])
    assert "--conf-thresh" in unimatch and "--conf-thresh" not in mean_teacher
    assert "--consistency" in mean_teacher


def test_bench_iterations_is_its_own_option_not_the_training_length():
    ns = _parser("mean_teacher").parse_args(["bench", "--data", "phantom", "--method", "supervised",
                                             "--iterations", "7"])
    assert ns.bench_iterations == 7 and not hasattr(ns, "iterations")


@pytest.mark.parametrize("command", [["train", "--iterations", "1", "--out", "{blocked}/run"],
                                     ["bench", "--method", "supervised", "--out", "{blocked}/bench.json"],
                                     ["bench", "--method", "supervised", "--profile", "{blocked}/profile"]])
def test_an_output_place_that_cannot_be_made_is_one_error_line(command, tmp_path, capsys):
    """An output folder under a regular file cannot be created: one line naming the path, exit code 2, no
    traceback; bench says so before measuring anything (nothing is lost)."""
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    argv = ["--no-json", *[a.format(blocked=blocked) for a in command], "--data", "phantom:4", "--device", "cpu"]
    assert cli.main(argv) == cli.protocol.EXIT_ERROR
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"semiseg: error: cannot use {blocked}") and "Traceback" not in captured.err
    assert "bench supervised" not in captured.out
