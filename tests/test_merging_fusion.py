"""Tests of aimm.merging.fusion on small hand-computed tensors."""

from __future__ import annotations

import pytest
import torch

from aimm.merging import (
    apply_,
    delta,
    importance_scores,
    init_importance,
    l1_norm,
    mask_fusion,
    mask_weights,
    snapshot,
    top_mask,
    update_importance,
    weighted_fusion,
)


def assert_close(a, b):
    # plain allclose: torch.testing.assert_close costs ~1 s of lazy imports on first use
    assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=1e-6), (a, b)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_snapshot_is_detached_copy():
    lin = torch.nn.Linear(2, 2)
    snap = snapshot(lin)
    assert set(snap) == {"weight", "bias"}
    assert not snap["weight"].requires_grad
    assert torch.equal(snap["weight"], lin.weight.detach())
    with torch.no_grad():
        lin.weight.add_(1.0)
    assert not torch.equal(snap["weight"], lin.weight.detach())
    assert snapshot(dict(lin.named_parameters())).keys() == snapshot(lin.named_parameters()).keys()
    assert snapshot({}) == {}


def test_delta_and_key_check():
    d = delta({"a": t(3.0, 1.0)}, {"a": t(1.0, 2.0)})
    assert torch.equal(d["a"], t(2.0, -1.0))
    with pytest.raises(ValueError, match="different keys"):
        delta({"a": t(1.0)}, {"b": t(1.0)})


def test_l1_norm_known_values():
    d = {"a": t(1.0, -2.0), "b": t([0.5, -0.5], [3.0, 0.0])}
    assert l1_norm(d) == 7.0
    assert l1_norm({}) == 0.0
    assert l1_norm({"h": torch.tensor([1.5, -2.5], dtype=torch.bfloat16)}) == 4.0


def test_weighted_fusion_exact():
    theta = {"a": t(1.0, 2.0)}
    d_in = {"a": t(2.0, -4.0)}
    d_out = {"a": t(4.0, 8.0)}
    out = weighted_fusion(theta, d_in, d_out, 0.5, 0.25)
    assert torch.equal(out["a"], t(3.0, 2.0))  # 1 + 1 + 1, 2 - 2 + 2
    # same arithmetic as the release: theta_t + (w_in * d_in + w_out * d_out)
    g = torch.Generator().manual_seed(0)
    th, di, do = (torch.randn(4, 3, generator=g) for _ in range(3))
    ref = th + (0.6 * di + 0.4 * do)
    assert torch.equal(weighted_fusion({"x": th}, {"x": di}, {"x": do}, 0.6, 0.4)["x"], ref)


def test_apply_copies_in_place_without_grad():
    lin = torch.nn.Linear(2, 1, bias=False)
    w = lin.weight
    apply_(lin, {"weight": t([5.0, 6.0])})
    assert lin.weight is w and torch.equal(lin.weight.detach(), t([5.0, 6.0]))
    assert lin.weight.grad_fn is None and lin.weight.requires_grad
    with pytest.raises(KeyError):
        apply_(lin, {"nope": t(1.0)})


def test_update_importance_known_values():
    params = {"p": t(2.0, -1.0)}
    grads = {"p": t(0.5, 3.0)}  # I = |p * g| = [1, 3]
    s0 = init_importance(params)
    s1 = update_importance(s0, params, grads, beta1=0.5, beta2=0.5)
    assert torch.equal(s1["ipt"]["p"], t(0.5, 1.5))
    assert torch.equal(s1["unc"]["p"], t(0.25, 0.75))  # 0.5 * |I - I_bar'|
    assert torch.equal(s0["ipt"]["p"], t(0.0, 0.0))  # input state untouched
    s2 = update_importance(s1, params, grads, beta1=0.5, beta2=0.5)
    assert torch.equal(s2["ipt"]["p"], t(0.75, 2.25))
    assert torch.equal(s2["unc"]["p"], t(0.25, 0.75))
    assert torch.equal(importance_scores(s2)["p"], t(0.1875, 1.6875))
    # defaults 0.85 / 0.85 against the formula; None state starts from zeros
    s = update_importance(None, params, grads)
    I = t(1.0, 3.0)
    ipt = 0.15 * I
    assert_close(s["ipt"]["p"], ipt)
    assert_close(s["unc"]["p"], 0.15 * (I - ipt).abs())
    # a missing gradient keeps that parameter's EMAs
    s3 = update_importance(s2, {"p": params["p"]}, {"p": None})
    assert s3["ipt"]["p"] is s2["ipt"]["p"]
    with pytest.raises(ValueError, match="beta1"):
        update_importance(None, params, grads, beta1=1.0)


def test_top_mask_global_and_per_tensor():
    scores = {"a": torch.arange(5.0), "b": torch.arange(10.0, 15.0)}
    # global: quantile(0.8) over [0..4, 10..14] = 12.2 -> only 13, 14 kept
    g = top_mask(scores)
    assert g["a"].tolist() == [False] * 5 and g["b"].tolist() == [False, False, False, True, True]
    # per tensor: quantile(0.8) = 3.2 and 13.2 -> last entry of each
    p = top_mask(scores, scope="per_tensor")
    assert p["a"].tolist() == [False] * 4 + [True] and p["b"].tolist() == [False] * 4 + [True]
    # agrees with torch.quantile (linear interpolation, strict >)
    x = torch.rand(37, 11, generator=torch.Generator().manual_seed(1))
    assert torch.equal(top_mask({"x": x})["x"], x > torch.quantile(x, 0.8))
    assert top_mask({"z": torch.zeros(4)})["z"].sum() == 0  # ties at the threshold dropped


def test_mask_fusion_2x2():
    theta = {"w": torch.ones(2, 2)}
    d_in = {"w": t([1.0, 2.0], [3.0, 4.0])}
    d_out = {"w": t([10.0, 20.0], [30.0, 40.0])}
    m_in = {"w": torch.tensor([[True, True], [False, False]])}
    m_out = {"w": torch.tensor([[True, False], [True, False]])}
    out = mask_fusion(theta, d_in, d_out, m_in, m_out)["w"]
    # both on: 0.4*1 + 0.6*10; only in: 2; only out: 30; both off: 0.5*4 + 0.5*40
    assert_close(out, t([1 + 6.4, 1 + 2.0], [1 + 30.0, 1 + 22.0]))
    w_in, w_out = mask_weights(m_in["w"], m_out["w"])
    assert_close(w_in, t([0.4, 1.0], [0.0, 0.5]))
    assert_close(w_out, t([0.6, 0.0], [1.0, 0.5]))
    # a non-exclusive one-on rule
    out2 = mask_fusion(theta, d_in, d_out, m_in, m_out, only_one_on=(0.7, 0.3))["w"]
    assert_close(out2, t([7.4, 1 + 0.7 * 2 + 0.3 * 20], [1 + 0.3 * 3 + 0.7 * 30, 23.0]))
