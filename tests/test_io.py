import json
import subprocess
import sys
import textwrap

import pytest
import torch

from utils.io import (
    UserError,
    atomic_write,
    load_json,
    load_pt,
    load_yaml,
    remove_temporaries,
    save_json,
    save_pt,
)


def test_save_pt_round_trip(tmp_path):
    path = tmp_path / "sub" / "x.pt"
    save_pt({"a": torch.arange(3)}, path)
    assert torch.equal(load_pt(path)["a"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == ["x.pt"]  # no temporary left behind


def test_interrupted_write_keeps_previous_file(tmp_path):
    path = tmp_path / "x.pt"
    save_pt(torch.tensor([1.0, 2.0]), path)
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_write(path) as tmp:
            tmp.write_bytes(b"half a file")
            raise RuntimeError("killed mid-write")
    assert torch.equal(load_pt(path), torch.tensor([1.0, 2.0]))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_missing_and_corrupt_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="expert file not found: .*nothing.pt"):
        load_pt(tmp_path / "nothing.pt", what="expert file")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="cannot read .*bad.pt"):
        load_pt(bad)
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(UserError, match="bad.json"):
        load_json(tmp_path / "bad.json")
    (tmp_path / "bad.yaml").write_text("a: [1, 2")
    with pytest.raises(UserError, match="bad.yaml"):
        load_yaml(tmp_path / "bad.yaml")


def test_load_pt_refuses_arbitrary_pickles(tmp_path):
    import os
    import pickle

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": os.getcwd}, f)  # a global that weights_only must not import
    with pytest.raises(UserError):
        load_pt(path)


def test_save_json(tmp_path):
    save_json({"acc": torch.tensor(0.5), "n": 3}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"acc": 0.5, "n": 3}


def test_run_main_prints_one_line_and_exits_2(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(
        textwrap.dedent(
            """
            from utils.io import UserError, run_main
            def main(args):
                raise UserError("bad value 7 for --x:\\n expected 1..3")
            run_main(main, lambda: None)
            """
        )
    )
    from utils.runtime import repo_root

    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(repo_root())},
    )
    assert result.returncode == 2
    assert result.stderr == "error: bad value 7 for --x: expected 1..3\n"
    assert "Traceback" not in result.stderr


def test_save_pt_writes_equal_bytes_for_equal_tensors(tmp_path):
    # torch names the archive inside after the file it writes; atomic writes go through random
    # temporary names, which must not leak into the file.
    value = {"x": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(3)}
    save_pt(value, tmp_path / "a.pt")
    save_pt(value, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


def test_remove_temporaries_finds_what_a_killed_atomic_write_leaves(tmp_path):
    with atomic_write(tmp_path / "replay_buffer_1.pt") as tmp:
        tmp.write_bytes(b"done")
    # a kill between creating the temporary and renaming it leaves a file of exactly that name
    leftover = tmp_path / tmp.name
    leftover.write_bytes(b"half")
    others = [
        "replay_buffer_1.pt",
        ".replay_buffer_10.pt.abcdefgh.tmp",  # another file's temporary
        "..replay_buffer_1.partial_0.pt.abcdefgh.tmp",  # of `.replay_buffer_1.partial_0.pt`
    ]
    for name in others[1:]:
        (tmp_path / name).write_bytes(b"")
    assert remove_temporaries(tmp_path, "replay_buffer_1.*") == [leftover]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)
