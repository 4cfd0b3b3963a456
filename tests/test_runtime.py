import random

import numpy as np
import pytest
import torch

from utils.io import UserError, load_pt, save_pt
from utils.runtime import (
    derived_seeds,
    gather_objects,
    get_rng_state,
    rank_and_world,
    rank_device,
    resolve_device,
    seed_everything,
    set_rng_state,
)


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


def test_derived_seeds_keep_both_stages_formulas():
    # buffer_CL's experts drew from SeedSequence(seed + k), the evaluation from
    # SeedSequence([seed, k]): one function gives both, unchanged
    for s in (0, 1, 41, 2**32 + 5):
        assert derived_seeds(s) == tuple(
            int(x) for x in np.random.SeedSequence(s).generate_state(2)
        )
    assert derived_seeds(3, 2) == tuple(
        int(x) for x in np.random.SeedSequence([3, 2]).generate_state(2)
    )
    assert len(set(derived_seeds(0)) | set(derived_seeds(1)) | set(derived_seeds(0, 1))) == 6


def test_rank_and_world_from_torchrun_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert rank_and_world() == (0, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert rank_and_world() == (2, 3)
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(UserError, match="RANK=3 and WORLD_SIZE=3 are inconsistent"):
        rank_and_world()


def test_rank_device_and_gather_in_one_process(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device("cpu", 2) == torch.device("cpu")
    assert gather_objects({"a": [1]}, 1) == [{"a": [1]}]
