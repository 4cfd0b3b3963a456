"""Gradient matching: DC, or DSA with `dsa: true` (docs/gm_dm.md#gradient-matching).

PAD's filters apply as config keys: `sort_method` with `remove_hard` / `remove_easy` (the
real data the matching sees) and `depth_ratio` (the shallow part of what is matched).

    python distill/DC.py --cfg configs/CIFAR-10/DC/IPC10.yaml --dsa true

See distill/condense.py for the outputs, resuming and every option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill import condense  # noqa: E402

if __name__ == "__main__":
    condense.run("DC")
