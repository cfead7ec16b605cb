"""Tests of aimm.methods.functional: the defining behaviour of each CL term."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aimm.errors import ConfigError
from aimm.methods.functional import (
    add_squared_grads_,
    agem_project,
    dot,
    ewc_penalty,
    ewc_penalty_grad,
    fisher_diagonal,
    lwf_loss,
    olora_l2_loss,
    olora_loss,
    olora_orthogonality_loss,
    update_fisher,
)


def rand(seed, **shapes):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) for k, s in shapes.items()}


# ----------------------------------------------------------------------------- EWC
def test_fisher_is_mean_squared_gradient_and_online_update_decays():
    b1, b2 = rand(0, w=(3, 2), b=(2,)), rand(1, w=(3, 2), b=(2,))
    fis = fisher_diagonal([b1, b2])
    for k in b1:
        assert torch.allclose(fis[k], (b1[k] ** 2 + b2[k] ** 2) / 2)
    acc = {}
    add_squared_grads_(acc, {"w": b1["w"], "skip": None})
    assert set(acc) == {"w"} and torch.allclose(acc["w"], b1["w"] ** 2)
    old = {"w": torch.full((2,), 4.0)}
    new = {"w": torch.tensor([1.0, 0.0])}
    assert torch.equal(update_fisher(old, new, gamma=0.5)["w"], torch.tensor([3.0, 2.0]))
    assert torch.equal(update_fisher(None, new)["w"], new["w"])
    with pytest.raises(ConfigError, match="gamma"):
        update_fisher(old, new, gamma=1.5)
    with pytest.raises(ConfigError, match="grad_batches"):
        fisher_diagonal([])


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_with_fisher():
    anchor = rand(2, w=(4, 3), b=(3,))
    fisher = {k: v.abs() for k, v in rand(3, w=(4, 3), b=(3,)).items()}
    assert ewc_penalty(anchor, anchor, fisher, lam=7.0).item() == 0.0
    theta = {k: v + 0.1 * torch.randn_like(v) for k, v in anchor.items()}
    p1 = ewc_penalty(theta, anchor, fisher, lam=7.0).item()
    bigger = {k: v + 0.5 for k, v in fisher.items()}  # elementwise larger Fisher
    assert p1 > 0 and ewc_penalty(theta, anchor, bigger, lam=7.0).item() > p1
    assert ewc_penalty(theta, anchor, {k: 2 * v for k, v in fisher.items()}, lam=7.0).item() == pytest.approx(2 * p1)
    # hand value: λ/2 · F · d² = 10/2 · 3 · 2² = 60
    assert ewc_penalty({"x": torch.tensor([3.0])}, {"x": torch.tensor([1.0])}, {"x": torch.tensor([3.0])},
                       lam=10.0).item() == pytest.approx(60.0)


def test_ewc_closed_form_gradient_equals_autograd():
    anchor = rand(4, w=(4, 3), b=(3,))
    fisher = {k: v.abs() for k, v in rand(5, w=(4, 3), b=(3,)).items()}
    theta = {k: (v + torch.randn_like(v)).requires_grad_() for k, v in anchor.items()}
    ewc_penalty(theta, anchor, fisher, lam=3.0).backward()
    closed = ewc_penalty_grad(theta, anchor, fisher, lam=3.0)
    for k in theta:
        assert torch.allclose(theta[k].grad, closed[k], atol=1e-6)
    with pytest.raises(ConfigError, match="fisher names"):
        ewc_penalty({}, anchor, fisher)


# ---------------------------------------------------------------------------- A-GEM
@pytest.mark.parametrize("seed", range(25))
def test_agem_projection_never_conflicts_with_the_reference(seed):
    g, r = rand(seed, w=(5, 4), b=(4,)), rand(1000 + seed, w=(5, 4), b=(4,))
    out, projected = agem_project(g, r)
    d = dot(out, r).item()
    scale = dot(g, g).sqrt().item() * dot(r, r).sqrt().item()
    assert d >= -1e-5 * scale
    assert projected == (dot(g, r).item() < 0)
    if projected:
        assert abs(d) <= 1e-5 * scale  # lies on the boundary g̃ᵀg_ref = 0
        # the removed part is parallel to g_ref
        diff = {k: g[k] - out[k] for k in g}
        cos = dot(diff, r) / (dot(diff, diff).sqrt() * dot(r, r).sqrt())
        assert cos.abs().item() == pytest.approx(1.0, abs=1e-5)
    else:
        assert all(torch.equal(out[k], g[k]) for k in g)


def test_agem_hand_example_and_zero_reference():
    g, r = {"x": torch.tensor([1.0, -2.0])}, {"x": torch.tensor([0.0, 1.0])}
    out, projected = agem_project(g, r)
    assert projected and torch.allclose(out["x"], torch.tensor([1.0, 0.0]))
    out, projected = agem_project(g, {"x": torch.zeros(2)})
    assert not projected and torch.equal(out["x"], g["x"])


# ------------------------------------------------------------------------------ LwF
def test_lwf_is_zero_at_equal_logits_and_matches_the_kl_formula():
    g = torch.Generator().manual_seed(6)
    teacher = torch.randn(2, 3, 11, generator=g)
    student = torch.randn(2, 3, 11, generator=g, requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert lwf_loss(teacher.clone(), teacher, mask).item() == pytest.approx(0.0, abs=1e-6)
    T = 2.0
    loss = lwf_loss(student, teacher, mask, temperature=T)
    p_t = F.softmax(teacher[mask] / T, -1)
    ref = (p_t * (p_t.log() - F.log_softmax(student[mask] / T, -1))).sum(-1).mean() * T * T
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()  # only the masked positions get a gradient
    assert student.grad[~mask].abs().max().item() == 0.0 and student.grad[mask].abs().max().item() > 0
    none = lwf_loss(student, teacher, torch.zeros(2, 3, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad
    with pytest.raises(ConfigError, match="temperature"):
        lwf_loss(student, teacher, mask, temperature=0.0)


# ---------------------------------------------------------------------------- O-LoRA
def test_olora_loss_is_zero_for_orthogonal_adapters_and_matches_hand_value():
    eye = torch.eye(6)
    old = [{"q": eye[0:2]}, {"q": eye[2:4]}]
    new = {"q": eye[4:6].clone()}
    assert olora_orthogonality_loss(new, old).item() == 0.0
    # hand value: A_old = [[1, 1]], A_new = [[2, -3]] -> |1*2 + 1*(-3)| = 1, twice (two old adapters)
    assert olora_orthogonality_loss({"q": torch.tensor([[2.0, -3.0]])},
                                    [{"q": torch.tensor([[1.0, 1.0]])}] * 2).item() == pytest.approx(2.0)
    # defaults λ1 = 0.5, λ2 = 0: the L2 term is skipped
    assert olora_loss({"q": torch.tensor([[2.0, -3.0]])}, [{"q": torch.tensor([[1.0, 1.0]])}]).item() == pytest.approx(0.5)
    p = {"A": torch.tensor([[3.0, 4.0]]), "B": torch.tensor([[0.0], [2.0]])}
    assert olora_l2_loss(p).item() == pytest.approx(5.0 + 2.0)
    assert olora_l2_loss(p, squared=True).item() == pytest.approx(25.0 + 4.0)
    with pytest.raises(ConfigError, match="new_params"):
        olora_loss(new, old, lambda_2=0.1)
    with pytest.raises(ConfigError, match=r"old_A\[0\]"):
        olora_orthogonality_loss({"k": eye[4:6]}, old)


def test_olora_loss_decreases_under_gradient_steps_on_the_new_adapter():
    g = torch.Generator().manual_seed(7)
    old = [{"q": torch.randn(4, 16, generator=g), "v": torch.randn(4, 16, generator=g)}]
    new = {k: torch.randn(4, 16, generator=g).requires_grad_() for k in ("q", "v")}
    opt = torch.optim.SGD(new.values(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = olora_loss(new, old)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < 0.5 * losses[0]
    assert all(b < a for a, b in zip(losses, losses[1:]))  # strictly decreasing at this step size
    assert all(not t.requires_grad for t in old[0].values())
