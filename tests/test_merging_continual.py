"""Tests of aimm.merging.continual: defining behaviour on small hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch
from peft.utils import merge_utils as pmu

from aimm.errors import ConfigError
from aimm.merging.continual import (
    dare_linear,
    dare_ties,
    lora_delta,
    lora_deltas,
    magmax,
    magmax_step,
    opcm_init,
    opcm_project,
    opcm_split_rank,
    opcm_step,
    task_arithmetic,
    task_arithmetic_step,
    task_vector_norm,
    ties,
    weight_average,
)


def close(a, b, tol=1e-5):
    return a.shape == b.shape and torch.allclose(a, b, rtol=tol, atol=tol)


def vecs(n=3, seed=0, shapes=(("a", (4, 5)), ("b", (6,)))):
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(*s, generator=g) for k, s in shapes} for _ in range(n)]


def test_lora_delta_is_scaled_B_at_A_and_pairs_peft_names():
    A, B = torch.randn(2, 5), torch.randn(3, 2)
    assert close(lora_delta(A, B, 0.5), 0.5 * B @ A)
    params = {"m.q.lora_A.default.weight": A, "m.q.lora_B.default.weight": B, "m.q.base_layer.weight": torch.ones(3, 5)}
    d = lora_deltas(params, {"m.q": 2.0})
    assert list(d) == ["m.q"] and close(d["m.q"], 2.0 * B @ A)
    with pytest.raises(ConfigError, match="no partner"):
        lora_deltas({"m.q.lora_A.default.weight": A})
    with pytest.raises(ConfigError, match="lora_delta"):
        lora_delta(A, torch.randn(3, 4))


def test_task_arithmetic_is_scaled_sum_and_step_form_agrees():
    vs = vecs()
    out = task_arithmetic(vs, scaling=0.3)
    for k in vs[0]:
        assert close(out[k], 0.3 * sum(v[k] for v in vs))
    run = {k: torch.zeros_like(t) for k, t in vs[0].items()}
    for v in vs:
        run = task_arithmetic_step(run, v, 0.3)
    assert all(close(run[k], out[k]) for k in out)


@pytest.mark.filterwarnings("ignore:The density 1.0:UserWarning")  # PEFT warns that density 1 prunes nothing
def test_ties_equals_peft_and_is_a_disjoint_mean():
    vs = vecs(seed=1)
    out = ties(vs, density=0.4, majority_sign_method="total", scaling=0.7)
    for k in vs[0]:
        ref = pmu.ties([v[k] for v in vs], torch.full((3,), 0.7), 0.4, "total")
        assert torch.equal(out[k], ref)
    # hand example: density 1 keeps all; sign of the sum is +, mean over the positives
    a, b = {"w": torch.tensor([3.0, -1.0])}, {"w": torch.tensor([1.0, -5.0])}
    assert close(ties([a, b], density=1.0)["w"], torch.tensor([2.0, -3.0]))


@pytest.mark.parametrize("fn, peft_fn, extra", [(dare_linear, pmu.dare_linear, ()),
                                                (dare_ties, pmu.dare_ties, ("total",))])
def test_dare_equals_peft_with_the_same_seed_and_leaves_global_rng_alone(fn, peft_fn, extra):
    vs = vecs(seed=2)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    out = fn(vs, density=0.3, scaling=0.5, seed=7)
    assert torch.equal(torch.rand(1), before)  # our call did not consume the global RNG
    torch.manual_seed(7)
    for k in vs[0]:  # PEFT on the same tensors, names in order, one RNG stream
        ref = peft_fn([v[k] for v in vs], torch.full((3,), 0.5), 0.3, *extra)
        assert torch.equal(out[k], ref)
    assert all(torch.equal(out[k], fn(vs, density=0.3, scaling=0.5, seed=7)[k]) for k in out)
    assert not torch.equal(out["a"], fn(vs, density=0.3, scaling=0.5, seed=8)["a"])


def test_bad_density_and_mismatched_vectors_name_the_parameter():
    vs = vecs()
    with pytest.raises(ConfigError, match="density"):
        dare_linear(vs, density=0.0)
    with pytest.raises(ConfigError, match="density"):
        ties(vs, density=1.5)
    with pytest.raises(ConfigError, match=r"vectors\[1\]"):
        task_arithmetic([vs[0], {"a": vs[1]["a"]}])
    with pytest.raises(ConfigError, match="at least one"):
        magmax([])


def test_magmax_picks_largest_magnitude_keeping_sign():
    a = {"w": torch.tensor([1.0, -4.0, 2.0, 0.5])}
    b = {"w": torch.tensor([-3.0, 1.0, 2.0, 0.0])}
    c = {"w": torch.tensor([2.0, 3.0, -2.0, -0.1])}
    out = magmax([a, b, c])["w"]
    assert torch.equal(out, torch.tensor([-3.0, -4.0, -2.0, 0.5]))  # tie at |2|: later task wins
    vs = vecs(4, seed=3)
    stacked = torch.stack([v["a"] for v in vs])
    idx = stacked.abs().argmax(0, keepdim=True)
    assert torch.equal(magmax(vs)["a"], stacked.gather(0, idx)[0])
    assert torch.equal(magmax_step(a, b)["w"], torch.tensor([-3.0, -4.0, 2.0, 0.5]))


def test_weight_average_is_the_mean_of_the_models():
    vs = vecs(5, seed=4)
    run = vs[0]
    for i, v in enumerate(vs[1:], 1):
        run = weight_average(run, v, count=i)
    for k in vs[0]:
        assert close(run[k], torch.stack([v[k] for v in vs]).mean(0))
    with pytest.raises(ConfigError, match="count"):
        weight_average(vs[0], vs[1], count=-1)


def test_opcm_split_rank_is_the_release_zero_based_index():
    s = torch.tensor([3.0, 2.0, 1.0])  # cumulative shares 0.5, 0.833, 1.0
    assert opcm_split_rank(s, 0.4) == 0
    assert opcm_split_rank(s, 0.6) == 1
    assert opcm_split_rank(s, 0.9) == 2
    assert opcm_split_rank(s, 1.0) == 0  # nothing exceeds 1: argmax of all-False


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.9])
def test_opcm_projection_is_orthogonal_to_the_protected_subspace(alpha):
    g = torch.Generator().manual_seed(5)
    merged = torch.randn(7, 2, generator=g) @ torch.randn(2, 5, generator=g) + 0.1 * torch.randn(7, 5, generator=g)
    task = torch.randn(7, 5, generator=g)
    out = opcm_project(merged, task, alpha)
    u, s, vh = torch.linalg.svd(merged, full_matrices=True)
    r = opcm_split_rank(s, alpha)
    coeff = u.T @ out @ vh.T
    assert coeff[:r, :r].abs().max().item() < 1e-5 if r else True
    assert coeff.diagonal().abs().max().item() < 1e-5
    assert abs((out * merged).sum().item()) < 1e-4  # Frobenius-orthogonal to the merged ΔW
    # everything outside the protected block and the diagonal is kept
    keep = torch.ones_like(coeff, dtype=torch.bool)
    keep[:r, :r] = False
    keep.diagonal().fill_(False)
    full = u.T @ task @ vh.T
    assert torch.allclose(coeff[keep], full[keep], atol=1e-5)
    one_d = torch.randn(5)
    assert torch.equal(opcm_project(torch.randn(5), one_d, alpha), one_d)


def test_opcm_step_adaptive_scaling_on_a_hand_example():
    first = {"w": torch.diag(torch.tensor([3.0, 2.0, 1.0])), "b": torch.tensor([1.0, 0.0])}
    merged, lam, norms = opcm_init(first)
    assert lam == 1.0 and norms == pytest.approx([math.sqrt(14.0 + 1.0)])
    task = {"w": torch.arange(1.0, 10.0).reshape(3, 3), "b": torch.tensor([0.0, 2.0])}
    out, lam2, norms2 = opcm_step(merged, task, prev_lambda=lam, task_norms=norms, alpha=0.9)
    # alpha 0.9 -> r = 2: zero the 2x2 block and the diagonal of τ (U = V = I up to sign)
    cleaned = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 6.0], [7.0, 8.0, 0.0]])
    s_w = first["w"] + cleaned
    s_b = first["b"] + task["b"]
    n_s = math.sqrt((s_w ** 2).sum().item() + (s_b ** 2).sum().item())
    n_task = math.sqrt(285.0 + 4.0)
    avg = (math.sqrt(15.0) + n_task) / 2
    assert norms2 == pytest.approx([math.sqrt(15.0), n_task])
    assert lam2 == pytest.approx(n_s / avg, rel=1e-6)
    assert close(out["w"], s_w / lam2) and close(out["b"], s_b / lam2)
    assert task_vector_norm(out) == pytest.approx(avg, rel=1e-6)
    # third step uses λ_2 to undo the previous normalisation
    third = {"w": torch.ones(3, 3), "b": torch.ones(2)}
    out3, lam3, norms3 = opcm_step(out, third, prev_lambda=lam2, task_norms=norms2, alpha=0.9)
    assert len(norms3) == 3 and task_vector_norm(out3) == pytest.approx(sum(norms3) / 3, rel=1e-6)
    with pytest.raises(ConfigError, match="alpha"):
        opcm_step(out, third, prev_lambda=1.0, task_norms=norms2, alpha=1.5)
