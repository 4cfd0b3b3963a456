"""The paper's two discussion figures from finished DC/DM runs: a Markdown table and one PNG
(docs/gm_dm.md#the-papers-figures).

Reads the run folders `<runs>/<DATASET>/<ipc>/<model>/f<filter>-<GM|DM>-<key>-r<ratio>-s<seed>/`
made by scripts/cpu/discussion.sh or scripts/reproduce/discussion.sh; a run's accuracy is the
last `accuracy/<model>` value of its metrics.jsonl (the evaluation at its last iteration).
The PNG has the paper's layout: one panel per (filter, method, IPC), accuracy against the
ratio, mean +- std over seeds, the ratio-0 baseline dashed.

    python scripts/discussion_figures.py --runs OUT/logged_files --out OUT/discussion
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.io import atomic_write  # noqa: E402

RUN = re.compile(
    r"^f(?P<filter>[12])-(?P<method>GM|DM)-(?P<key>remove_hard|remove_easy|depth_ratio)"
    r"-r(?P<ratio>[0-9.]+)-s(?P<seed>\d+)$"
)
TITLES = {"remove_hard": "filter 1, remove hard", "remove_easy": "filter 1, remove easy",
          "depth_ratio": "filter 2, shallow ratio"}  # fmt: skip


def final_accuracy(run_dir: Path) -> float | None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    values = [v for line in path.read_text().splitlines()
              for k, v in json.loads(line).items() if k.startswith("accuracy/")]  # fmt: skip
    return values[-1] if values else None


def collect(runs: Path) -> dict[tuple, dict[float, list[float]]]:
    """(filter key, method, ipc) -> ratio -> accuracies over seeds."""
    panels: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run_dir in sorted(runs.glob("*/*/*/*")):
        match = RUN.match(run_dir.name)
        accuracy = final_accuracy(run_dir) if match else None
        if accuracy is None:
            continue
        key = (match["key"], match["method"], int(run_dir.parents[1].name))
        panels[key][float(match["ratio"])].append(accuracy)
    return panels


def markdown(panels: dict) -> str:
    lines = ["| setting | " + " | ".join(["ratio", "accuracy % (mean +- std)", "seeds"]) + " |",
             "|---|---|---|---|"]  # fmt: skip
    for (filt, method, ipc), by_ratio in sorted(panels.items()):
        for ratio, accs in sorted(by_ratio.items()):
            std = statistics.pstdev(accs) if len(accs) > 1 else 0.0
            lines.append(f"| {method} IPC {ipc}, {TITLES[filt]} | {ratio:g} | "
                         f"{statistics.fmean(accs):.2f} +- {std:.2f} | {len(accs)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(panels: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(panels)
    columns = min(len(keys), 4)  # the paper's rows of four panels
    rows = -(-len(keys) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(keys) :]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys, strict=False):
        filt, method, ipc = key
        ratios = sorted(panels[key])
        means = [statistics.fmean(panels[key][r]) for r in ratios]
        stds = [statistics.pstdev(panels[key][r]) if len(panels[key][r]) > 1 else 0.0
                for r in ratios]  # fmt: skip
        ax.errorbar([100 * r for r in ratios], means, yerr=stds, marker="o", capsize=3)
        if 0.0 in panels[key]:
            ax.axhline(statistics.fmean(panels[key][0.0]), linestyle="--", color="grey",
                       label="baseline (ratio 0)")  # fmt: skip
            ax.legend(fontsize=8)
        ax.set_title(f"{method} IPC {ipc}: {TITLES[filt]}", fontsize=9)
        ax.set_xlabel("ratio %")
        ax.set_ylabel("test accuracy %")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def main(args: argparse.Namespace) -> None:
    panels = collect(Path(args.runs))
    if not panels:
        sys.exit(f"no finished discussion runs under {args.runs}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(panels)
    with atomic_write(out.with_suffix(".md")) as tmp:
        tmp.write_text(table)
    plot(panels, out.with_suffix(".png"))
    print(table)
    print(f"table: {out.with_suffix('.md')}; figure: {out.with_suffix('.png')}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", required=True, help="the logged_files folder of the runs")
    parser.add_argument("--out", required=True, help="output path without suffix (.md, .png)")
    main(parser.parse_args())
