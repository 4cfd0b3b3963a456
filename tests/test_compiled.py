"""utils/compiled.py and the fast evaluation modes of utils/train_nets.py and utils/evaluate.py:
compiled and bf16 passes agree with float32 eager ones, one compilation per architecture, mode
and shape, and every bad setting is a UserError.

Compilation uses a counting backend that runs the captured graph as it is (no C++ build), so the
tests check the caching and the functional forward, not inductor's kernels (those are measured in
scripts/bench/eval_speed.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import utils.compiled as compiled
import utils.evaluate as evaluate
from utils.io import UserError
from utils.networks import get_network
from utils.train_nets import TrainConfig, network_logits, networks_accuracy, train_networks

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture
def graphs(monkeypatch, one_thread):
    """Compile with a backend that records each compiled graph's input shapes."""
    seen: list[tuple] = []

    def counting_backend(gm, example_inputs):
        seen.append(tuple(tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)))
        return gm.forward

    compiled.clear_cache()
    monkeypatch.setattr(compiled, "BACKEND", counting_backend)
    yield seen
    compiled.clear_cache()


def fresh(model="ConvNetW32", count=2, seed=0):
    torch.manual_seed(seed)
    return [get_network(model, 3, 4, (16, 16)) for _ in range(count)]


def tiny_set(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.arange(n) % 4


def train(nets, images, labels, config):
    gens = [torch.Generator().manual_seed(k) for k in range(len(nets))]
    return train_networks(nets, images, labels, 0.01, gens, config, batched=False)


@pytest.mark.parametrize("model", ["ConvNetW32", "ConvNetBN"])
def test_compiled_training_and_logits_equal_eager(graphs, model):
    images, labels = tiny_set(10)
    test = torch.randn(11, 3, 16, 16)
    eager, fast = fresh(model), fresh(model)
    h_eager = train(eager, images, labels, TrainConfig(epochs=2, batch_train=4))
    h_fast = train(fast, images, labels, TrainConfig(epochs=2, batch_train=4, compile=True))
    assert graphs, "nothing was compiled"
    torch.testing.assert_close(h_fast.loss, h_eager.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(eager, fast, strict=True):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)  # incl. BN stats
    want = network_logits(eager, test, batched=False, batch=4)
    got = network_logits(fast, test, batched=False, batch=4, compile=True)  # 4, 4, 3 padded
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_one_compilation_per_architecture_mode_and_shape(graphs):
    images, labels = tiny_set(10)  # batches of 4: shapes 4 and 2
    config = TrainConfig(epochs=1, batch_train=4, compile=True)
    train(fresh(count=3), images, labels, config)
    train_graphs = [s[-1] for s in graphs]  # the input x is the last graph input
    assert sorted(train_graphs) == [(2, 3, 16, 16), (4, 3, 16, 16)]
    networks_accuracy(fresh(count=2), torch.randn(9, 3, 16, 16), torch.zeros(9, dtype=torch.long),
                      batched=False, batch=4, compile=True)  # fmt: skip
    assert len(graphs) == 3  # eval mode: one graph, the last batch padded to 4
    # a second evaluation of the same set size with fresh networks: nothing new
    train(fresh(count=2, seed=1), images, labels, config)
    networks_accuracy(fresh(count=2), torch.randn(9, 3, 16, 16), torch.zeros(9, dtype=torch.long),
                      batched=False, batch=4, compile=True)  # fmt: skip
    assert len(graphs) == 3
    # another set size: only its new last-batch shape compiles (12 = 3 x 4: none)
    train(fresh(count=1), *tiny_set(12), config)
    assert len(graphs) == 3
    train(fresh(count=1), *tiny_set(7), config)
    assert len(graphs) == 4 and graphs[-1][-1] == (3, 3, 16, 16)
    # another architecture, or bf16: its own graphs
    train(fresh("ConvNetW64", count=1), images, labels, config)
    assert len(graphs) == 6


def test_a_failed_compilation_warns_once_and_runs_eagerly(monkeypatch, one_thread):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no kernels today")

    compiled.clear_cache()
    monkeypatch.setattr(compiled, "BACKEND", broken_backend)
    images, labels = tiny_set(8)
    eager, fast = fresh(count=1), fresh(count=1)
    train(eager, images, labels, TrainConfig(epochs=1, batch_train=4))
    with pytest.warns(UserWarning, match="torch.compile failed .*evaluating it eagerly"):
        train(fast, images, labels, TrainConfig(epochs=1, batch_train=4, compile=True))
    for p, q in zip(eager[0].parameters(), fast[0].parameters(), strict=True):
        torch.testing.assert_close(q, p)
    compiled.clear_cache()  # strict: the same failure raises
    net = fresh(count=1)[0]
    with pytest.raises(Exception, match="no kernels today"):
        compiled.compiled_forward(net, "off", CPU, backend=broken_backend, strict=True)(
            dict(net.named_parameters()), dict(net.named_buffers()), images
        )
    compiled.clear_cache()


def test_bf16_logits_and_training_close_to_float32(one_thread):
    """bf16 keeps 8 bits of mantissa: logits within 3% of their scale, the loss curve of a short
    training within 5% (tolerances stated here, loose on purpose)."""
    images, labels = tiny_set(12)
    nets = fresh(count=2)
    f32 = network_logits(nets, images, batched=False)
    bf16 = network_logits(nets, images, batched=False, amp="bf16")
    assert bf16.dtype == torch.float32
    assert (bf16 - f32).abs().max() <= 0.03 * f32.abs().max()
    a, b = fresh(count=1), fresh(count=1)
    ha = train(a, images, labels, TrainConfig(epochs=3, batch_train=4))
    hb = train(b, images, labels, TrainConfig(epochs=3, batch_train=4, amp="bf16"))
    torch.testing.assert_close(hb.loss, ha.loss, rtol=0.05, atol=0.02)


def test_resolve_amp_and_compile(monkeypatch):
    monkeypatch.setattr(evaluate, "bf16_supported", lambda device: True)
    assert evaluate.resolve_amp("auto", CPU) == "bf16"
    assert evaluate.resolve_amp("off", CPU) == "off"
    monkeypatch.setattr(evaluate, "bf16_supported", lambda device: False)
    assert evaluate.resolve_amp("auto", CPU) == "off"
    with pytest.raises(UserError, match="amp bf16 on cpu, which has no native bfloat16"):
        evaluate.resolve_amp("bf16", CPU)
    with pytest.raises(UserError, match="amp 'fp16' is unknown: expected one of auto, off, bf16"):
        evaluate.resolve_amp("fp16", CPU)
    monkeypatch.setattr(compiled, "cxx_compiler", lambda: "g++")
    assert compiled.resolve_compile("auto", CPU) and compiled.resolve_compile(True, CPU)
    assert not compiled.resolve_compile("false", CPU)
    monkeypatch.setattr(compiled, "cxx_compiler", lambda: None)
    assert not compiled.resolve_compile("auto", CPU)
    with pytest.raises(UserError, match="--compile true on the CPU needs a C\\+\\+ compiler"):
        compiled.resolve_compile("true", CPU)
    with pytest.raises(UserError, match="--compile 'yes' is unknown"):
        compiled.resolve_compile("yes", CPU)


def test_compile_with_batched_is_a_user_error(one_thread):
    images, labels = tiny_set(6)
    with pytest.raises(UserError, match="compile and batched=True cannot be combined"):
        train_networks(fresh(), images, labels, 0.01, [torch.Generator()] * 2,
                       TrainConfig(epochs=0, compile=True), batched=True)  # fmt: skip


def test_evaluation_script_compile_true_without_compiler_is_one_line_exit_2(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "CXX": str(tmp_path / "no-such-g++"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "distill" / "evaluation.py"), "--random_ipc=1",
         "--compile=true", "--device=cpu", f"--data_path={tmp_path}"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a C++ compiler" in lines[0], done.stderr
