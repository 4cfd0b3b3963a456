"""Every stage's command line: help and default for every flag, booleans spelt the same way."""

import argparse
import importlib.util
from pathlib import Path

import pytest

from utils.config import HelpFormatter, config_parser, format_default, str2bool

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str):
    """A stage script as a module of its own name (not the one other tests import)."""
    name = "cli_" + Path(relative).stem
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPTS = ("buffer/buffer_CL.py", "buffer/rank_difficulty.py", "distill/evaluation.py")
STAGES = {relative: load_script(relative) for relative in SCRIPTS}


def parsers():
    for relative, module in STAGES.items():
        yield relative, module.build_parser(), "none"
    yield "distill/PAD_depth.py", config_parser(), "null"


def options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


PARSERS = list(parsers())


@pytest.mark.parametrize("relative, parser, none", PARSERS, ids=[p[0] for p in PARSERS])
def test_every_option_has_help_and_its_default_in_the_help_text(
    relative, parser, none, monkeypatch
):
    monkeypatch.setenv("COLUMNS", "1000")  # long defaults (paths) stay on one line
    assert parser.formatter_class is not argparse.HelpFormatter
    assert issubclass(parser.formatter_class, HelpFormatter)
    text = " ".join(parser.format_help().split())
    for action in options(parser):
        flag = action.option_strings[-1]
        assert action.help and action.help.strip(), f"{relative} {flag}: no help"
        default = format_default(action.default, none)
        assert f"{action.help} (default: {default})" in text, f"{relative} {flag}"


def test_some_defaults_read_as_expected(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    help_of = {relative: " ".join(STAGES[relative].build_parser().format_help().split())
               for relative in SCRIPTS}  # fmt: skip
    assert "--zca [BOOL] ZCA-whiten the real data (default: false)" in help_of[SCRIPTS[0]]
    assert "--num_experts NUM_EXPERTS experts to train (default: 100)" in help_of[SCRIPTS[0]]
    assert "(default: color_crop_cutout_flip_scale_rotate)" in help_of[SCRIPTS[0]]
    assert "--overwrite [BOOL] replace an existing file (default: false)" in help_of[SCRIPTS[1]]
    assert "--batched [BOOL|auto]" in help_of[SCRIPTS[2]]
    batched = help_of[SCRIPTS[2]].split("--batched [BOOL|auto]")[-1].split(" --")[0]
    assert batched.endswith("(default: auto)")


def boolean_flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in options(parser) if a.type is str2bool]


def test_every_stage_has_its_booleans_as_flags():
    found = {relative: {a.dest for a in boolean_flags(module.build_parser())}
             for relative, module in STAGES.items()}  # fmt: skip
    assert {"zca", "dsa", "adaptive", "compile", "decay"} <= found["buffer/buffer_CL.py"]
    assert found["buffer/rank_difficulty.py"] == {"zca", "overwrite"}
    assert {"zca", "dsa", "no_aug", "parall_eva"} <= found["distill/evaluation.py"]
    # no boolean is left as store_true/store_false, which would refuse `--flag false`
    for relative, module in STAGES.items():
        for action in options(module.build_parser()):
            assert not isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction), (
                relative, action.dest)  # fmt: skip


SPELLINGS = [
    ([], True), (["true"], True), (["false"], False), (["True"], True), (["False"], False),
    (["1"], True), (["0"], False), (["yes"], True), (["no"], False),
]  # fmt: skip


@pytest.mark.parametrize("relative", SCRIPTS)
@pytest.mark.parametrize("words, value", SPELLINGS)
def test_every_boolean_flag_of_every_stage_reads_the_same(relative, words, value):
    module = STAGES[relative]
    for action in boolean_flags(module.build_parser()):
        flag = action.option_strings[-1]
        # the flag is followed by another option, as on a real command line
        args = module.parse_args([flag, *words, "--seed", "3"])
        assert getattr(args, action.dest) is value, (relative, flag, words)
        assert args.seed == 3
        args = module.parse_args([f"{flag}={words[0]}"] if words else [flag])
        assert getattr(args, action.dest) is value, (relative, flag, words)


@pytest.mark.parametrize("relative", SCRIPTS)
def test_boolean_defaults_and_a_bad_word(relative, capsys):
    module = STAGES[relative]
    args = module.parse_args([])
    for action in boolean_flags(module.build_parser()):
        assert getattr(args, action.dest) is action.default
    with pytest.raises(SystemExit):
        module.parse_args(["--zca", "perhaps"])
    assert "expected a boolean" in capsys.readouterr().err


def test_zca_spellings_keep_the_old_defaults():
    # before, --zca was a store_true flag in these three stages: absent still means false
    for relative in SCRIPTS:
        assert STAGES[relative].parse_args([]).zca is False
    evaluation = STAGES["distill/evaluation.py"]
    assert evaluation.parse_args([]).batched is None  # auto
    assert evaluation.parse_args(["--batched", "auto"]).batched is None
    assert evaluation.parse_args(["--batched"]).batched is True
    assert evaluation.parse_args(["--batched=false"]).batched is False
