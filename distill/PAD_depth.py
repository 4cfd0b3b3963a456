"""PAD with the depth mask: match only the deeper parameters (drop the first depth_ratio of them).

The student's flat parameter vector runs from the first layer to the last, so its first
depth_ratio coordinates are the shallowest parameters; the matching loss leaves them out.

    cd distill
    python PAD_depth.py --cfg ../configs/CIFAR-10/ConvIN/IPC10.yaml

See distill/pad.py for the outputs, resuming and every option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill import pad  # noqa: E402

if __name__ == "__main__":
    pad.run("depth")
