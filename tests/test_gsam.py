"""utils/gsam.py against hand-computed updates (docs/algorithms.md#gsam)."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from utils.gsam import GSAM
from utils.io import UserError

A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)  # L(w) = 1/2 w^T A w


class TwoScalars(nn.Module):
    """Two separate one-element parameters, so GSAM's norms must span parameter tensors."""

    def __init__(self, w):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([w[0]], dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor([w[1]], dtype=torch.float64))

    def forward(self):
        w = torch.cat([self.a, self.b])
        return 0.5 * w @ A @ w, w.unsqueeze(0)


def hand_gsam_update(w, rho, alpha, lr, adaptive):
    """GSAM by the formulas of docs/algorithms.md#gsam, written out for the
    quadratic (gradient A w)."""
    g = A @ w
    if adaptive:
        e = rho * w**2 * g / (torch.linalg.norm(w.abs() * g) + 1e-12)
    else:
        e = rho * g / (torch.linalg.norm(g) + 1e-12)
    gp = A @ (w + e)
    ng, ngp = torch.linalg.norm(g), torch.linalg.norm(gp)
    cos = (g @ gp) / (ng * ngp + 1e-12)
    vertical = g - cos * ng * gp / (ngp + 1e-12)
    return w - lr * (gp - alpha * vertical)


@pytest.mark.parametrize("adaptive", [True, False])
def test_quadratic_step_matches_hand_computation(adaptive):
    w0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    model = TwoScalars(w0.tolist())
    gsam = GSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5, alpha=0.3,
                adaptive=adaptive)  # fmt: skip
    loss, logits = gsam.step(model)
    expected = hand_gsam_update(w0, 0.5, 0.3, 0.1, adaptive)
    got = torch.cat([model.a.detach(), model.b.detach()])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # the first pass's loss and logits, at w0
    assert loss.item() == pytest.approx(0.5 * float(w0 @ A @ w0))
    torch.testing.assert_close(logits, w0.unsqueeze(0))
    # the surrogate-gap term and the ascent really changed the step
    plain_sgd = w0 - 0.1 * (A @ w0)
    assert (got - plain_sgd).abs().max() > 1e-3


def test_adaptive_and_plain_differ_as_computed_by_hand():
    # a literal check of the formulas: w = (1, -2), A w = (1, -3)
    w0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    g = torch.tensor([1.0, -3.0], dtype=torch.float64)
    torch.testing.assert_close(A @ w0, g)
    # plain: e = rho * g / |g| = 0.5 * (1, -3) / sqrt(10); adaptive: |w| g = (1, 6), norm sqrt(37),
    # e = 0.5 * (1 * 1, 4 * -3) / sqrt(37)
    e_plain = 0.5 * g / 10**0.5
    e_adaptive = 0.5 * torch.tensor([1.0, -12.0], dtype=torch.float64) / 37**0.5
    for adaptive, e in ((False, e_plain), (True, e_adaptive)):
        model = TwoScalars(w0.tolist())
        seen = []

        def compute_loss(model=model, seen=seen):
            seen.append(torch.cat([model.a.detach(), model.b.detach()]).clone())
            return model()

        GSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5, alpha=0.0,
             adaptive=adaptive).step(compute_loss)  # fmt: skip
        assert len(seen) == 2
        torch.testing.assert_close(seen[1] - seen[0], e, rtol=1e-12, atol=1e-12)
        # alpha = 0: the step is plain SGD with the gradient at w + e
        final = torch.cat([model.a.detach(), model.b.detach()])
        torch.testing.assert_close(final, w0 - 0.1 * (A @ (w0 + e)), rtol=1e-12, atol=1e-12)


class SmallBNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.classifier = nn.Linear(6, 3)

    def forward(self, x):
        return self.classifier(F.relu(self.bn(self.fc1(x))))


def make_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_rho_zero_is_plain_sgd_with_one_pass(alpha):
    torch.manual_seed(0)
    model = SmallBNNet()
    twin = copy.deepcopy(model)
    gsam, base = GSAM(model, sgd(model), rho=0.0, alpha=alpha), sgd(twin)
    x, y = make_batch()
    calls = []

    def compute_loss():
        calls.append(1)
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    for step in range(3):
        gsam.step(compute_loss)
        assert len(calls) == step + 1  # exactly one forward/backward per step
        base.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        base.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    torch.testing.assert_close(model.bn.running_mean, twin.bn.running_mean, rtol=0, atol=0)
    assert int(model.bn.num_batches_tracked) == 3


def test_step_undoes_perturbation_and_updates_bn_once():
    """Parameters after a step equal the base SGD step along the combined direction, computed
    independently with torch.func; BN statistics move once (first pass only)."""
    torch.manual_seed(0)
    model = SmallBNNet()
    reference = copy.deepcopy(model)
    x, y = make_batch()
    rho, alpha = 0.2, 0.4
    names = [n for n, _ in model.named_parameters()]
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers0 = {n: b.clone() for n, b in model.named_buffers()}

    def grad_at(params):
        params = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        buffers = {n: b.clone() for n, b in buffers0.items()}  # throwaway BN statistics
        loss = F.cross_entropy(functional_call(reference, (params, buffers), (x,)), y)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))])

    flat_w = torch.cat([w0[n].reshape(-1) for n in names])
    g = grad_at(w0)
    e = rho * flat_w**2 * g / (torch.linalg.norm(flat_w.abs() * g) + 1e-12)
    sizes = [w0[n].numel() for n in names]
    w_pert = {n: w0[n] + part.view_as(w0[n]) for n, part in zip(names, e.split(sizes), strict=True)}
    gp = grad_at(w_pert)
    cos = (g @ gp) / (g.norm() * gp.norm() + 1e-12)
    direction = gp - alpha * (g - cos * g.norm() * gp / (gp.norm() + 1e-12))

    base = sgd(reference)
    for p, part in zip(reference.parameters(), direction.split(sizes), strict=True):
        p.grad = part.view_as(p).clone()
    base.step()

    gsam = GSAM(model, sgd(model), rho=rho, alpha=alpha, adaptive=True)
    loss, _ = gsam.step(lambda: (F.cross_entropy(logits := model(x), y), logits))

    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # BatchNorm statistics moved once, by the first pass at w0 (momentum 0.1)
    pre_bn = x @ w0["fc1.weight"].T + w0["fc1.bias"]
    torch.testing.assert_close(model.bn.running_mean, 0.1 * pre_bn.mean(0))
    torch.testing.assert_close(model.bn.running_var, 0.9 + 0.1 * pre_bn.var(0, unbiased=True))
    assert int(model.bn.num_batches_tracked) == 1
    # the returned loss is the first pass's
    buffers = {n: b.clone() for n, b in buffers0.items()}
    first_pass = F.cross_entropy(functional_call(reference, ({**w0, **buffers},), (x,)), y)
    assert loss.item() == pytest.approx(first_pass.item(), rel=1e-6)


def test_bad_rho_is_a_user_error():
    model = SmallBNNet()
    with pytest.raises(UserError, match="rho"):
        GSAM(model, sgd(model), rho=-0.1, alpha=0.3)
    with pytest.raises(UserError, match="alpha"):
        GSAM(model, sgd(model), rho=0.1, alpha=float("nan"))
