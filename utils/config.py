"""Distillation configuration: ALGORITHMS 9's defaults table, YAML files and command-line overrides.

Precedence: defaults < `--cfg file.yaml` < `--key value` on the command line. Every key has one
type, taken from this table; a YAML key that is not in the table, a key written twice, or a value
of the wrong type is a `UserError` naming the key (ints are accepted where floats are expected).
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from utils.io import UserError, load_yaml, save_yaml

TRUE_WORDS = {"true", "1", "yes", "y", "on"}
FALSE_WORDS = {"false", "0", "no", "n", "off"}


def str2bool(value: str | bool) -> bool:
    """argparse type for booleans: true/false/True/False/1/0/yes/no."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false/1/0), got {value!r}")


# key: (default, type). Types: bool, int, float, str, "int?" (int or null), "list|str" (device).
# ALGORITHMS 9, in its order; the keys after `Label_Model_Timestamp` are ours.
SCHEMA: dict[str, tuple[Any, Any]] = {
    "dataset": ("CIFAR10", str),
    "subset": ("imagenette", str),
    "model": ("ConvNet", str),
    "ipc": (1, int),
    "eval_mode": ("S", str),
    "num_eval": (5, int),
    "eval_it": (100, int),
    "epoch_eval_train": (1000, int),
    "Iteration": (5000, int),
    "lr_img": (1000.0, float),
    "lr_teacher": (0.01, float),
    "lr_init": (0.01, float),
    "batch_real": (256, int),
    "batch_syn": (256, "int?"),
    "batch_train": (256, int),
    "pix_init": ("samples_predicted_correctly", str),
    "dsa": (True, bool),
    "dsa_strategy": ("color_crop_cutout_flip_scale_rotate", str),
    "data_path": ("../dataset/", str),
    "buffer_path": ("../buffer_storage/", str),
    "expert_epochs": (2, int),
    "syn_steps": (80, int),
    "max_start_epoch": (25, int),
    "min_start_epoch": (0, int),
    "zca": (True, bool),
    "load_all": (False, bool),
    "no_aug": (False, bool),
    "texture": (False, bool),
    "canvas_size": (2, int),
    "canvas_samples": (1, int),
    "max_files": (None, "int?"),
    "max_experts": (None, "int?"),
    "force_save": (False, bool),
    "ema_decay": (0.999, float),
    "lr_y": (2.0, float),
    "Momentum_y": (0.9, float),
    "project": ("TEST", str),
    "name": ("RANDOM", str),
    "threshold": (1.0, float),
    "loss_ratio": (0.0, float),
    "depth_ratio": (0.0, float),
    "record_loss": (False, bool),
    "Sequential_Generation": (True, bool),
    "expansion_end_epoch": (3000, int),
    "current_max_start_epoch": (20, int),
    "init_frozen": ("start", str),
    "skip_first_eva": (False, bool),
    "parall_eva": (False, bool),
    "lr_lr": (1e-05, float),
    "res": (32, int),
    "device": ([0], "list|str"),
    "Initialize_Label_With_Another_Model": (False, bool),
    "Initialize_Label_Model": ("", str),
    "Initialize_Label_Model_Dir": ("", str),
    "Label_Model_Timestamp": (-1, int),
    # ---- ours: each default keeps the paper's behaviour ----
    "seed": (42, int),
    "memory": ("recompute", str),
    "checkpoint_it": (100, int),
    "resume": (False, bool),
    "wandb": ("off", str),
    "amp": ("off", str),
    "max_per_class": (None, "int?"),
    "eval_seed": (0, int),
    "out_dir": ("logged_files", str),
}

DEFAULTS: dict[str, Any] = {key: default for key, (default, _) in SCHEMA.items()}


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping key written twice (the authors' files do this)."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise UserError(
                f"duplicate key {key!r} in {node.start_mark.name} (lines {seen[key]} and {line}): "
                "keep one of them"
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, SCHEMA, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def coerce(key: str, value: Any, origin: str) -> Any:
    """Check `value` against the type of `key`; return it converted (int->float, '1e-5'->float)."""
    if key not in SCHEMA:
        raise UserError(f"unknown config key {key!r} in {origin}{_suggest(key)}")
    _, kind = SCHEMA[key]
    if kind == "int?":
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        kind = int
    if kind == "list|str":
        if isinstance(value, (list, str, int)) and not isinstance(value, bool):
            return value
    elif kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).strip().lower() in TRUE_WORDS | FALSE_WORDS:
            return str2bool(str(value))
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-5` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    expected = {"int?": "an integer or null", "list|str": "a GPU id list or a device name"}.get(
        SCHEMA[key][1], getattr(kind, "__name__", str(kind))
    )
    where = f"option --{key}" if origin == "the command line" else f"config key {key!r} in {origin}"
    raise UserError(
        f"{where} has value {value!r} of type {type(value).__name__}; "
        f"expected {expected} (default {SCHEMA[key][0]!r})"
    )


def read_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read a config file, refusing duplicate keys, unknown keys and wrong types."""
    path = Path(path)
    load_yaml(path, what="config file")  # clear errors for missing files and bad YAML first
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise UserError(f"cannot read config file {path}: {' '.join(str(exc).split())}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must be a mapping of key: value lines")
    return {key: coerce(key, value, str(path)) for key, value in raw.items()}


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """`--key value` / `--key=value` pairs; values are read as YAML (lists, null, numbers)."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise UserError(f"unexpected argument {token!r}: options look like --key value")
        if "=" in token:
            key, text = token[2:].split("=", 1)
            i += 1
        else:
            key = token[2:]
            if key not in SCHEMA:
                raise UserError(f"unknown option --{key}{_suggest(key)}")
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                if SCHEMA[key][1] is bool:  # a bare boolean flag means true
                    overrides[key] = True
                    i += 1
                    continue
                raise UserError(f"option --{key} needs a value")
            text = argv[i + 1]
            i += 2
        if key not in SCHEMA:
            raise UserError(f"unknown option --{key}{_suggest(key)}")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        if SCHEMA[key][1] is str and not isinstance(value, str):
            value = text  # names such as `--name 123` stay strings
        overrides[key] = coerce(key, value, "the command line")
    return overrides


def load_config(cfg_path: str | None, overrides: list[str] | None = None) -> SimpleNamespace:
    """Defaults, then the YAML file, then the command-line overrides."""
    values = dict(DEFAULTS)
    if cfg_path:
        values.update(read_yaml_config(cfg_path))
    values.update(parse_overrides(list(overrides or [])))
    return SimpleNamespace(**values)


def parse_config_args(argv: list[str] | None, description: str = "") -> SimpleNamespace:
    """Distillation scripts' command line: `--cfg file.yaml` plus `--key value` for any key."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Any key of the config table can be given as --key value (ALGORITHMS 9).",
    )
    parser.add_argument("--cfg", default=None, help="YAML config file")
    args, rest = parser.parse_known_args(argv)
    config = load_config(args.cfg, rest)
    config.cfg = args.cfg
    return config


def save_config(config: SimpleNamespace | dict, path: str | Path) -> None:
    values = dict(vars(config)) if isinstance(config, SimpleNamespace) else dict(config)
    save_yaml(values, path)
