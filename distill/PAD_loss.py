"""PAD with the loss mask: drop the loss_ratio of parameters with the smallest matching error.

    cd distill
    python PAD_loss.py --cfg ../configs/CIFAR-10/ConvIN/IPC10.yaml

Every iteration ranks the coordinates of the student's parameter vector by their squared distance
to the expert's target and leaves the loss_ratio of them that are closest out of the loss.
See distill/pad.py for the outputs, resuming and every option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill import pad  # noqa: E402

if __name__ == "__main__":
    pad.run("loss")
