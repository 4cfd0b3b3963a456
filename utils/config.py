"""Distillation configuration: one table of keys, YAML files, command-line overrides and --help.

Every key of the distillation has one entry in `KEYS` (name, default, kind, one-line help, group);
the YAML validation, the `--key value` options, `--help` and docs/config.md all come from it
(`python -m utils.config --markdown > docs/config.md` writes the latter).
Precedence: defaults < `--cfg file.yaml` < `--key value` on the command line. A YAML key that is
not in the table, a key written twice, or a value of the wrong kind is a `UserError` naming the
key (ints are accepted where floats are expected). Keys of the authors' configs that nothing here
reads are accepted, with one warning naming those that were set.

The other stages share the boolean flags (`add_bool_flag`) and the help layout (`HelpFormatter`).
"""

from __future__ import annotations

import argparse
import difflib
import sys
import warnings
from dataclasses import dataclass
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


# ---- the table ---------------------------------------------------------------------------------

PAPER, OURS, COMPAT = "paper", "ours", "compat"
GROUP_TITLES = {
    PAPER: "the paper's keys (the authors' names and defaults)",
    OURS: "keys of this implementation (each default keeps the paper's behaviour)",
    COMPAT: "accepted for compatibility, without effect (one warning names those set)",
}
# kind -> (type column of docs/config.md, metavar in --help, "expected ..." of a type error)
KINDS = {
    "bool": ("bool", "BOOL", "bool"),
    "int": ("int", "INT", "int"),
    "float": ("float", "FLOAT", "float"),
    "str": ("str", "TEXT", "str"),
    "int?": ("int or null", "INT|null", "an integer or null"),
    "float?": ("float or null", "FLOAT|null", "a number or null"),
    "device": ("GPU id list or device name", "DEVICE", "a GPU id list or a device name"),
}


@dataclass(frozen=True)
class Key:
    """One config key: its name, default, kind (a key of KINDS), one-line help and group."""

    name: str
    default: Any
    kind: str
    help: str
    group: str = PAPER


# The authors' table in its order, then ours.
KEYS: dict[str, Key] = {
    key.name: key
    for key in (
        Key("dataset", "CIFAR10", "str",
            "data set: CIFAR10, CIFAR100, Tiny, ImageNet, MNIST, FashionMNIST or ImageFolder"),
        Key("subset", "imagenette", "str", "ImageNet subset (imagenette, imagewoof, ...)"),
        Key("model", "ConvNet", "str", "architecture of the students (and of the experts)"),
        Key("ipc", 1, "int", "synthetic images per class"),
        Key("eval_mode", "S", "str",
            "evaluation pool: S (the model), C (the model and ConvNet) or a pool letter "
            "(M, W, D, A, P, N, BN, X)"),
        Key("num_eval", 5, "int", "networks trained per pool model at each evaluation"),
        Key("eval_it", 100, "int", "evaluate the synthetic set every eval_it iterations"),
        Key("epoch_eval_train", 1000, "int", "training epochs of each evaluation network"),
        Key("Iteration", 5000, "int", "distillation iterations (the loop runs it = 0..Iteration)"),
        Key("lr_img", 1000.0, "float", "learning rate of the synthetic images (SGD, momentum 0.5)"),
        Key("lr_teacher", 0.01, "float", "initial value of the learnable student learning rate"),
        Key("lr_init", 0.01, "float", "unused in the authors' code as well", COMPAT),
        Key("batch_real", 256, "int", "real-data batch of the authors' ImageNet loaders", COMPAT),
        Key("batch_syn", 256, "int?", "synthetic images per inner step (null: all of them)"),
        Key("batch_train", 256, "int", "batch size of the evaluation networks' training"),
        Key("pix_init", "samples_predicted_correctly", "str",
            "initial images: real, noise or samples_predicted_correctly (by the experts)"),
        Key("dsa", True, "bool",
            "DSA augmentation in the inner loop and in evaluation (false: none in the loop, "
            "DC augmentation in evaluation)"),
        Key("dsa_strategy", "color_crop_cutout_flip_scale_rotate", "str",
            "the DSA operations, joined by '_' (none: no augmentation)"),
        Key("data_path", "../dataset/", "str", "folder of the data set"),
        Key("buffer_path", "../buffer_storage/", "str",
            "root folder of the expert files (buffer_CL.py's --buffer_path)"),
        Key("expert_epochs", 2, "int", "expert epochs between the start and the target snapshot"),
        Key("syn_steps", 80, "int", "student steps unrolled on the synthetic set per iteration"),
        Key("max_start_epoch", 25, "int", "upper bound (exclusive) of the start epoch"),
        Key("min_start_epoch", 0, "int", "lower bound of the start epoch"),
        Key("zca", True, "bool", "ZCA-whiten the real data (the experts must match)"),
        Key("load_all", False, "bool",
            "keep every expert in memory and draw one at random per iteration (else one file "
            "at a time)"),
        Key("no_aug", False, "bool", "no augmentation in the inner loop (evaluation keeps it)"),
        Key("texture", False, "bool", "MTT's texture distillation, not part of PAD: must be false"),
        Key("canvas_size", 2, "int", "canvas size of texture distillation", COMPAT),
        Key("canvas_samples", 1, "int", "canvas samples of texture distillation", COMPAT),
        Key("max_files", None, "int?", "use only the first max_files expert files (null: all)"),
        Key("max_experts", None, "int?",
            "use only the first max_experts experts of each file (null: all)"),
        Key("force_save", False, "bool",
            "write the viewable images and PNG grids also when ipc >= 50"),
        Key("ema_decay", 0.999, "float", "set in the authors' configs, read by none of their code",
            COMPAT),
        Key("lr_y", 2.0, "float", "learning rate of the soft labels (SGD)"),
        Key("Momentum_y", 0.9, "float", "momentum of the soft labels' SGD"),
        Key("project", "TEST", "str", "wandb project (with wandb offline or online)"),
        Key("name", "RANDOM", "str",
            "run name, the run folder's name (RANDOM: <dataset>-IPC<ipc>-<mask>-s<seed>)"),
        Key("threshold", 1.0, "float",
            "skip an iteration's update when its matching loss exceeds threshold"),
        Key("loss_ratio", 0.0, "float",
            "PAD_loss.py: fraction of the parameters with the smallest matching error dropped"),
        Key("depth_ratio", 0.0, "float",
            "PAD_depth.py: fraction of the parameters, shallowest first, dropped"),
        Key("record_loss", False, "bool", "unused in the authors' code as well", COMPAT),
        Key("Sequential_Generation", True, "bool",
            "widen the start-epoch window from current_max_start_epoch to max_start_epoch"),
        Key("expansion_end_epoch", 3000, "int",
            "iterations (despite the name) over which the start-epoch window widens"),
        Key("current_max_start_epoch", 20, "int",
            "initial upper bound (exclusive) of the start epoch with Sequential_Generation"),
        Key("init_frozen", "start", "str", "unused in the authors' code as well", COMPAT),
        Key("skip_first_eva", False, "bool", "no evaluation at iteration 0"),
        Key("parall_eva", False, "bool",
            "the authors' DataParallel evaluation; here evaluation runs on device", COMPAT),
        Key("lr_lr", 1e-05, "float", "learning rate of the student learning rate (SGD, "
            "momentum 0.5)"),
        Key("res", 32, "int", "resolution level of ImageNet's expert folder path"),
        Key("device", [0], "device", "GPU id list (the first is used), or auto, cpu, cuda, cuda:N"),
        Key("Initialize_Label_With_Another_Model", False, "bool",
            "select the initial images and make the soft labels with Initialize_Label_Model"),
        Key("Initialize_Label_Model", "", "str",
            "that other architecture (with Initialize_Label_With_Another_Model)"),
        Key("Initialize_Label_Model_Dir", "", "str", "unused in the authors' code as well",
            COMPAT),
        Key("Label_Model_Timestamp", -1, "int",
            "expert snapshot that selects the images and makes the soft labels (-1: the last)"),
        Key("seed", 42, "int",
            "seed of the initial set, the start epochs, the inner batches and the expert order",
            OURS),
        Key("memory", "auto", "str",
            "inner-loop memory: auto (graph if it fits memory_budget_gb, else hybrid, else "
            "recompute), graph (all steps' graphs, as the authors), recompute (one step's graph "
            "at a time) or hybrid; same gradient", OURS),
        Key("memory_budget_gb", None, "float?",
            "memory auto's budget in GB for the unroll (null: half the free device memory, or "
            "of MemAvailable on CPU)", OURS),
        Key("hybrid_kept_steps", None, "int?",
            "memory hybrid: final inner steps whose graphs are kept (null: half of syn_steps)",
            OURS),
        Key("checkpoint_it", 100, "int",
            "write checkpoint.pt every checkpoint_it iterations and at the end", OURS),
        Key("resume", False, "bool", "continue the run of the same folder from its checkpoint.pt "
            "(a folder without one starts again from iteration 0)", OURS),
        Key("max_skipped", 50, "int?",
            "stop when this many consecutive iterations skip their update (loss above "
            "threshold); null: never", OURS),
        Key("wandb", "off", "str",
            "wandb logging: off, offline or online (metrics.jsonl is always written)", OURS),
        Key("amp", "off", "str",
            "precision of the inner steps: off (float32, the paper's) or bf16 autocast "
            "(parameters, adjoints and the matching loss stay float32); with eval_amp auto, "
            "bf16 also makes the evaluation bf16", OURS),
        Key("channels_last", False, "bool",
            "the inner steps' batches in channels-last memory format", OURS),
        Key("compile", False, "bool",
            "torch.compile the graph-free inner steps of recompute and hybrid (needs a C++ "
            "compiler on CPU; compiles for minutes first)", OURS),
        Key("eval_amp", "auto", "str",
            "evaluation precision: auto (bf16 where the device has native bf16, or when amp is "
            "bf16), off (float32) or bf16", OURS),
        Key("eval_compile", "auto", "str",
            "torch.compile the evaluation networks: auto (where torch can compile), true or false",
            OURS),
        Key("max_per_class", None, "int?",
            "use only the first max_per_class train images of each class (null: all)", OURS),
        Key("val_per_class", 0, "int",
            "hold out the last N train images per class and keep images_best by their accuracy "
            "(0: off, select by test accuracy as the paper)", OURS),
        Key("eval_seed", 0, "int",
            "the evaluation at iteration it seeds its networks with eval_seed + it", OURS),
        Key("out_dir", "logged_files", "str",
            "root of the run folders, <out_dir>/<dataset>/<ipc>/<model>/<name>", OURS),
        Key("distributed", False, "bool",
            "split every inner step's batch across torchrun's processes (on by itself when "
            "WORLD_SIZE > 1; true in a plain run: a world of one)", OURS),
        Key("world_size", 1, "int",
            "written to config.yaml: the number of processes the run used; read, never used "
            "(the result does not depend on it)", OURS),
    )
}  # fmt: skip

DEFAULTS: dict[str, Any] = {name: key.default for name, key in KEYS.items()}
UNUSED_KEYS: tuple[str, ...] = tuple(name for name, key in KEYS.items() if key.group == COMPAT)

# ---- the DC/DSA and DM tables (distill/DC.py, distill/DM.py) -----------------------------------


def _condense_keys(method: str) -> dict[str, Key]:
    """The table of distill/DC.py (method "DC") or distill/DM.py ("DM"): the original methods'
    keys and defaults (docs/gm_dm.md#defaults), then PAD's two filters and ours."""
    dc = method == "DC"
    keys = [
        Key("dataset", "CIFAR10", "str", KEYS["dataset"].help),
        Key("subset", "imagenette", "str", KEYS["subset"].help),
        Key("model", "ConvNet", "str", "architecture of the matching networks"),
        Key("ipc", 1, "int", "synthetic images per class"),
        Key(
            "Iteration",
            1000 if dc else 20000,
            "int",
            "distillation iterations (the loop runs it = 0..Iteration)",
        ),
        Key(
            "lr_img",
            0.1 if dc else 1.0,
            "float",
            "learning rate of the synthetic images (SGD, momentum 0.5)",
        ),
        Key(
            "lr_net",
            0.01,
            "float",
            ("SGD learning rate of the inner-loop network and " if dc else "")
            + "learning rate of the evaluation networks",
        ),
        Key(
            "batch_real",
            256,
            "int",
            "real images per class and step (a larger value takes the whole class)",
        ),
        Key(
            "batch_train",
            256,
            "int",
            ("batch of the inner-loop training and " if dc else "")
            + "batch of the evaluation networks' training",
        ),
        Key(
            "init",
            "noise" if dc else "real",
            "str",
            "initial images: noise (N(0, 1)) or real (random kept train images)",
        ),
        Key(
            "dsa",
            not dc,
            "bool",
            "DSA, one shared draw for a class's real and synthetic batch"
            + (" (true: DSA, false: DC)" if dc else "")
            + "; also in evaluation",
        ),
        Key(
            "dsa_strategy",
            "color_crop_cutout_flip_scale_rotate",
            "str",
            "the DSA operations, joined by '_' (digits: without flip)",
        ),
        Key("eval_mode", "S", "str", KEYS["eval_mode"].help),
        Key("num_eval", 20, "int", "networks trained per pool model at each evaluation"),
        Key(
            "eval_it",
            500 if dc else 2000,
            "int",
            "evaluate the synthetic set every eval_it iterations",
        ),
        Key(
            "epoch_eval_train",
            None if dc else 1000,
            "int?",
            "training epochs of each evaluation network"
            + (" (null: 300, or 1000 with dsa)" if dc else ""),
        ),
        Key("data_path", "../dataset/", "str", "folder of the data set"),
        Key("zca", False, "bool", "ZCA-whiten the real data (the original methods do not)"),
    ]
    if dc:
        keys += [
            Key(
                "dis_metric",
                "ours",
                "str",
                "gradient distance: ours (layer-wise, per output row), mse or cos",
            ),
            Key(
                "outer_loop",
                None,
                "int?",
                "image updates per iteration (null: the DC code's value for the ipc)",
            ),
            Key(
                "inner_loop",
                None,
                "int?",
                "network epochs on the synthetic set between image updates (null: by ipc)",
            ),
        ]
    keys += [
        Key(
            "sort_method",
            "",
            "str",
            "PAD filter 1: difficulty index file, a NAME under indices_path or a .pt path "
            "(empty: none)",
            OURS,
        ),
        Key(
            "indices_path",
            "data_indices",
            "str",
            "folder of the index files named by sort_method",
            OURS,
        ),
        Key(
            "remove_hard",
            0.0,
            "float",
            "PAD filter 1: fraction of each class's hardest images never drawn",
            OURS,
        ),
        Key(
            "remove_easy",
            0.0,
            "float",
            "PAD filter 1: fraction of each class's easiest images never drawn",
            OURS,
        ),
        Key(
            "depth_ratio",
            0.0,
            "float",
            "PAD filter 2: fraction of the "
            + ("flattened parameters" if dc else "multi-layer features")
            + f", shallowest first, not matched (0: plain {method})",
            OURS,
        ),
        Key("max_per_class", None, "int?", KEYS["max_per_class"].help, OURS),
        Key(
            "seed", 42, "int", "seed of every draw of the run (init, networks, batches, DSA)", OURS
        ),
        Key(
            "checkpoint_it",
            100 if dc else 500,
            "int",
            "write checkpoint.pt every checkpoint_it iterations and at the end",
            OURS,
        ),
        Key("resume", False, "bool", KEYS["resume"].help, OURS),
        Key("skip_first_eva", False, "bool", "no evaluation at iteration 0", OURS),
        Key("eval_seed", 0, "int", KEYS["eval_seed"].help, OURS),
        Key("amp", "off", "str", KEYS["amp"].help, OURS),
        Key("force_save", False, "bool", KEYS["force_save"].help, OURS),
        Key("wandb", "off", "str", KEYS["wandb"].help, OURS),
        Key("project", "TEST", "str", KEYS["project"].help, OURS),
        Key(
            "name",
            "RANDOM",
            "str",
            f"run name, the run folder's name (RANDOM: <dataset>-IPC<ipc>-{method}-s<seed>)",
            OURS,
        ),
        Key("out_dir", "logged_files", "str", KEYS["out_dir"].help, OURS),
        Key("device", "auto", "device", "auto, cpu, cuda or cuda:N (or a GPU id list)", OURS),
    ]
    if not dc:
        keys += [
            Key(
                "embed_amp",
                "off",
                "str",
                "precision of the embedding forward: off (float32) or bf16 autocast",
                OURS,
            ),
            Key(
                "channels_last",
                False,
                "bool",
                "images and network in channels_last memory format",
                OURS,
            ),
            Key("compile", False, "bool", "torch.compile the embedding network's forward", OURS),
        ]
    return {key.name: key for key in keys}


DC_KEYS = _condense_keys("DC")  # fmt: skip
DM_KEYS = _condense_keys("DM")


def format_default(value: Any, none: str = "null") -> str:
    """A value as a user writes it: true/false, null (or `none`), [0], "" for an empty text."""
    if value is None:
        return none
    if isinstance(value, bool):
        return str(value).lower()
    if value == "":
        return '""'
    return str(value)


# ---- YAML files --------------------------------------------------------------------------------


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


def _suggest(key: str, keys: dict[str, Key] = KEYS) -> str:
    close = difflib.get_close_matches(key, keys, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


_INVALID = object()


def _convert(kind: str, value: Any) -> Any:
    """`value` as `kind`, or _INVALID (ints become floats; YAML 1.1's `1e-5` string a float)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind in ("int?", "float?"):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        kind = kind[:-1]
    if kind == "device" and isinstance(value, (list, str, int)) and not isinstance(value, bool):
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).strip().lower() in TRUE_WORDS | FALSE_WORDS:
            return str2bool(str(value))
    if kind == "int" and number and isinstance(value, int):
        return value
    if kind == "float" and number:
        return float(value)
    if kind == "float" and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if kind == "str" and isinstance(value, str):
        return value
    return _INVALID


def coerce(key: str, value: Any, origin: str, keys: dict[str, Key] = KEYS) -> Any:
    """Check `value` against the kind of `key`; return it converted (int->float, '1e-5'->float)."""
    if key not in keys:
        raise UserError(f"unknown config key {key!r} in {origin}{_suggest(key, keys)}")
    spec = keys[key]
    converted = _convert(spec.kind, value)
    if converted is not _INVALID:
        return converted
    where = f"option --{key}" if origin == "the command line" else f"config key {key!r} in {origin}"
    raise UserError(
        f"{where} has value {value!r} of type {type(value).__name__}; "
        f"expected {KINDS[spec.kind][2]} (default {spec.default!r})"
    )


def read_yaml_config(path: str | Path, keys: dict[str, Key] = KEYS) -> dict[str, Any]:
    """Read a config file, refusing duplicate keys, unknown keys and wrong types."""
    path = Path(path)
    load_yaml(path, what="config file")  # clear errors for missing files and bad YAML first
    try:
        with path.open() as stream:  # a stream, so that errors name the file
            raw = yaml.load(stream, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise UserError(f"cannot read config file {path}: {' '.join(str(exc).split())}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must be a mapping of key: value lines")
    return {key: coerce(key, value, str(path), keys) for key, value in raw.items()}


# ---- the command line --------------------------------------------------------------------------


def parse_overrides(argv: list[str], keys: dict[str, Key] = KEYS) -> dict[str, Any]:
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
            if key not in keys:
                raise UserError(f"unknown option --{key}{_suggest(key, keys)}")
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                if keys[key].kind == "bool":  # a bare boolean flag means true
                    overrides[key] = True
                    i += 1
                    continue
                raise UserError(f"option --{key} needs a value")
            text = argv[i + 1]
            i += 2
        if key not in keys:
            raise UserError(f"unknown option --{key}{_suggest(key, keys)}")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        if keys[key].kind == "str" and not isinstance(value, str):
            value = text  # names such as `--name 123` stay strings
        overrides[key] = coerce(key, value, "the command line", keys)
    return overrides


def warn_unused(given: dict[str, Any], keys: dict[str, Key] = KEYS) -> None:
    """One warning naming the set keys that nothing reads (never for defaults)."""
    names = [name for name, key in keys.items() if key.group == COMPAT and name in given]
    if names:
        warnings.warn(
            f"config keys without effect in this implementation (kept from the authors' "
            f"configs): {', '.join(names)}; remove them to silence this warning",
            UserWarning,
            stacklevel=3,
        )


def load_config(
    cfg_path: str | None, overrides: list[str] | None = None, keys: dict[str, Key] = KEYS
) -> SimpleNamespace:
    """Defaults, then the YAML file, then the command-line overrides (`keys`: the script's
    table, KEYS for PAD, DC_KEYS or DM_KEYS for distill/DC.py and distill/DM.py)."""
    given = read_yaml_config(cfg_path, keys) if cfg_path else {}
    given.update(parse_overrides(list(overrides or []), keys))
    warn_unused(given, keys)
    return SimpleNamespace(**{**{name: key.default for name, key in keys.items()}, **given})


class HelpFormatter(argparse.HelpFormatter):
    """Every stage's --help: each option's sentence followed by its default."""

    none_text = "none"  # how a default of None reads on this command line

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.nargs != 0 and action.default is not argparse.SUPPRESS:
            default = format_default(action.default, self.none_text).replace("%", "%%")
            text += f" (default: {default})"
        return text


class ConfigHelpFormatter(HelpFormatter):
    none_text = "null"  # the distillation's values are YAML


def add_bool_flag(parser: Any, flag: str, default: bool | None, help: str) -> None:
    """A boolean option that reads the same in every stage: `--zca`, `--zca true`, `--zca false`
    (and True/False/1/0/yes/no). `parser` is an ArgumentParser or an argument group."""
    parser.add_argument(
        flag, type=str2bool, nargs="?", const=True, default=default, metavar="BOOL", help=help
    )


CONFIG_EPILOG = (
    "Booleans also work bare (--zca means --zca true); values are read as YAML (--device "
    "'[0, 1]', --max_files null). Every key is described in docs/config.md."
)


def config_parser(description: str = "", keys: dict[str, Key] = KEYS) -> argparse.ArgumentParser:
    """The distillation's --help: --cfg and every key of the table, by group.

    The values themselves are parsed by `parse_overrides` (YAML-typed, with the errors above);
    this parser only describes them.
    """
    parser = argparse.ArgumentParser(
        usage="%(prog)s [-h] [--cfg FILE] [--KEY VALUE ...]",
        description=description,
        epilog=CONFIG_EPILOG,
        formatter_class=ConfigHelpFormatter,
    )
    example = "configs/CIFAR-10/" + ("ConvIN" if keys is KEYS else "DM") + "/IPC10.yaml"
    parser.add_argument("--cfg", default=None, metavar="FILE", help=f"YAML file, e.g. {example}")
    for group, title in GROUP_TITLES.items():
        section = parser.add_argument_group(title)
        for key in keys.values():
            if key.group != group:
                continue
            if key.kind == "bool":
                add_bool_flag(section, f"--{key.name}", key.default, key.help)
            else:
                section.add_argument(
                    f"--{key.name}", default=key.default, metavar=KINDS[key.kind][1], help=key.help
                )
    return parser


def parse_config_args(
    argv: list[str] | None, description: str = "", keys: dict[str, Key] = KEYS
) -> SimpleNamespace:
    """Distillation scripts' command line: `--cfg file.yaml` plus `--key value` for any key."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--cfg", default=None)
    parser.add_argument("-h", "--help", action="store_true")
    args, rest = parser.parse_known_args(argv)
    if args.help:
        config_parser(description, keys).print_help()
        sys.exit(0)
    config = load_config(args.cfg, rest, keys)
    config.cfg = args.cfg
    return config


def save_config(config: SimpleNamespace | dict, path: str | Path) -> None:
    """The run's config snapshot; keys without effect are left out, so it reloads silently."""
    values = dict(vars(config)) if isinstance(config, SimpleNamespace) else dict(config)
    save_yaml({k: v for k, v in values.items() if k not in UNUSED_KEYS}, path)


# ---- docs/config.md ----------------------------------------------------------------------------


def config_markdown() -> str:
    """docs/config.md, generated from KEYS (a test keeps the file equal to this text)."""
    lines = [
        "# Distillation configuration",
        "",
        "<!-- Generated by `python -m utils.config --markdown > docs/config.md` from the table",
        "     in utils/config.py; edit the table, not this file. -->",
        "",
        "`distill/PAD_depth.py` and `distill/PAD_loss.py` read one configuration: the defaults",
        "below, replaced by the keys of a YAML file given with `--cfg`, replaced in turn by",
        "`--key value` (or `--key=value`) options. Values are read as YAML, so `--max_files null`",
        "and `--device '[0, 1]'` work; a boolean key given bare (`--zca`) means true, and",
        "booleans may be spelt true/false, True/False, 1/0 or yes/no. A key that is not in these",
        "tables, a key written twice in a file, or a value of the wrong type is an error naming",
        "the key (an integer is accepted where a float is expected).",
        "`python distill/PAD_depth.py --help` lists the same keys.",
        "",
        "    cd distill",
        "    python PAD_depth.py --cfg ../configs/CIFAR-10/ConvIN/IPC10.yaml --Iteration 2000",
        "",
        "The run folder keeps a `config.yaml` with the values the run used; it is itself a valid",
        "`--cfg` file. The other stages (`buffer/rank_difficulty.py`, `buffer/buffer_CL.py`,",
        "`distill/evaluation.py`) take command-line flags only, listed with their defaults by",
        "`--help`; their boolean flags read the same way (`--zca`, `--zca true`, `--zca false`).",
        "",
    ]
    intros = {
        PAPER: "The keys of the authors' configuration, with their names and defaults.",
        OURS: "Keys this implementation adds; each default keeps the paper's behaviour.",
        COMPAT: "Keys that appear in the authors' configs but that nothing here reads. They are "
        "accepted, so the authors' files load, and one warning names those a file or the "
        "command line sets. `texture` is not among them: it is refused when true.",
    }
    titles = {PAPER: "The paper's keys", OURS: "Keys of this implementation",
              COMPAT: "Accepted for compatibility"}  # fmt: skip
    for group, title in titles.items():
        lines += [f"## {title}", "", intros[group], "", "| key | type | default | meaning |",
                  "|---|---|---|---|"]  # fmt: skip
        for key in KEYS.values():
            if key.group == group:
                kind = KINDS[key.kind][0]
                meaning = key.help.replace("<", "&lt;").replace(">", "&gt;")  # not HTML tags
                lines.append(f"| `{key.name}` | {kind} | `{format_default(key.default)}` | "
                             f"{meaning} |")  # fmt: skip
        lines.append("")
    lines += _condense_markdown()
    return "\n".join(lines)


def _condense_markdown() -> list[str]:
    """The sections of docs/config.md for distill/DC.py and distill/DM.py."""
    lines = []
    for method, keys, what in (
        ("DC", DC_KEYS, "gradient matching: DC, and DSA with `dsa: true`"),
        ("DM", DM_KEYS, "distribution matching"),
    ):
        lines += [
            f"## distill/{method}.py",
            "",
            f"`distill/{method}.py` ({what}, docs/gm_dm.md) reads its own table through the "
            "same machinery: defaults < `--cfg` < `--key value`. The first group is the "
            "original method's keys with its defaults; the rest are PAD's filters and ours.",
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        for key in keys.values():
            meaning = key.help.replace("<", "&lt;").replace(">", "&gt;")
            kind, default = KINDS[key.kind][0], format_default(key.default)
            lines.append(f"| `{key.name}` | {kind} | `{default}` | {meaning} |")
        lines.append("")
    return lines


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description="Print the config table as docs/config.md.")
    cli.add_argument("--markdown", action="store_true", help="print docs/config.md")
    if cli.parse_args().markdown:
        print(config_markdown(), end="")
    else:
        cli.print_help()
