"""Fingerprints of a fixed-seed tiny run of every stage, to show that a refactor changed nothing.

Makes a tiny ImageFolder data set (3 classes, 16x16), then runs, each through its command line
and on the CPU with one thread: rank_difficulty.py, buffer_CL.py (curriculum), PAD_depth.py,
PAD_loss.py and evaluation.py. Prints one line per tensor file written: its path relative to the
work folder, the SHA-256 of the file's bytes and of its tensors' contents. Run it before and
after a change and compare the two outputs:

    python scripts/dev/stage_fingerprints.py > before.txt
    ... change the code ...
    python scripts/dev/stage_fingerprints.py > after.txt && diff before.txt after.txt

`--keep DIR` keeps the work folder (default: a temporary one, removed at the end).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.conftest import make_color_image_folder  # noqa: E402

MODEL = "ConvNetW32"


def run(script: str, *args: object, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PAD_CACHE_DIR": str(cwd / "cache")}
    command = [sys.executable, str(ROOT / script), *map(str, args)]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{script} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def tensor_digest(value: object, digest: hashlib._Hash) -> None:
    """Feed the contents of every tensor in a nested structure, in order, to `digest`."""
    if isinstance(value, torch.Tensor):
        digest.update(str((value.dtype, tuple(value.shape))).encode())
        digest.update(
            value.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes()
        )
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            tensor_digest(value[key], digest)
    elif isinstance(value, (list, tuple)):
        for item in value:
            tensor_digest(item, digest)
    else:
        digest.update(repr(value).encode())


def fingerprints(work: Path) -> list[str]:
    lines = []
    for path in sorted(work.rglob("*.pt")):
        relative = path.relative_to(work)
        if relative.parts[0] == "cache" or path.name == "checkpoint.pt":
            continue  # its layout may change; its tensors are also in the numbered files
        file_hash = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        content = hashlib.sha256()
        tensor_digest(torch.load(path, weights_only=True), content)
        lines.append(f"{relative}  file {file_hash}  tensors {content.hexdigest()[:16]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", help="keep the work folder here instead of a temporary one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = work / "data"
        if not data.exists():
            make_color_image_folder(data, 3, 16, {"train": 12, "test": 6})
        common = ["--dataset", "ImageFolder", "--data_path", data, "--device", "cpu"]
        run("buffer/rank_difficulty.py", *common, "--model", MODEL, "--epochs", 2, "--repeat", 2,
            "--batch", 8, "--out", work / "indices", "--name", "tiny_GraNd", cwd=work)  # fmt: skip
        run("buffer/buffer_CL.py", *common, "--model", MODEL, "--zca", "--train_epochs", 4,
            "--num_experts", 2, "--save_interval", 1, "--batch_train", 8,
            "--buffer_path", work / "buffer", "--sort_method", work / "indices/tiny_GraNd.pt",
            "--init_ratio", 0.5, "--add_end_epoch", 1, "--rm_epoch_first", 2,
            "--rm_epoch_second", 3, "--rm_easy_ratio_first", 0.25, "--rm_easy_ratio_second", 0.5,
            "--rho_max", 0.05, "--rho_min", 0.05, cwd=work)  # fmt: skip
        distill = [*common, "--model", MODEL, "--zca", "true", "--buffer_path", work / "buffer",
                   "--out_dir", work / "logged_files", "--ipc", 2, "--syn_steps", 4,
                   "--expert_epochs", 2, "--max_start_epoch", 2, "--Iteration", 6,
                   "--eval_it", 3, "--epoch_eval_train", 4, "--num_eval", 2, "--batch_syn", 4,
                   "--batch_train", 4, "--lr_img", 100, "--lr_y", 2, "--lr_lr", 1e-5,
                   "--threshold", 10, "--Sequential_Generation", "false", "--checkpoint_it", 4,
                   "--depth_ratio", 0.25, "--loss_ratio", 0.25]  # fmt: skip
        run("distill/PAD_depth.py", *distill, "--memory", "recompute", cwd=work)
        run("distill/PAD_loss.py", *distill, "--memory", "graph", cwd=work)
        normal = work / "logged_files/ImageFolder/2" / MODEL / "ImageFolder-IPC2-depth-s42/Normal"
        run("distill/evaluation.py", *common, "--model", MODEL, "--zca",
            "--data_dir", normal / "images_best.pt", "--label_dir", normal / "labels_best.pt",
            "--lr_dir", normal / "lr_best.pt", "--num_eval", 2, "--epoch_eval_train", 4,
            "--out", work / "eval.json", cwd=work)  # fmt: skip
        accs = json.loads((work / "eval.json").read_text())["models"][MODEL]["accs"]
        for line in fingerprints(work):
            print(line)
        print(f"evaluation accuracies {accs}")


if __name__ == "__main__":
    main()
