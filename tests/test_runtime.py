import random

import numpy as np
import pytest
import torch

from utils.io import UserError, load_pt, save_pt
from utils.runtime import get_rng_state, resolve_device, seed_everything, set_rng_state


def draw():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_rng_state_round_trip_through_a_file(tmp_path):
    seed_everything(3)
    draw()
    save_pt(get_rng_state(), tmp_path / "rng.pt")
    expected = draw()
    draw()
    set_rng_state(load_pt(tmp_path / "rng.pt"))
    assert draw() == expected


def test_seed_everything_is_repeatable():
    seed_everything(7)
    first = draw()
    seed_everything(7)
    assert draw() == first


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="CUDA is not available"):
            assert resolve_device([0]) == torch.device("cpu")
