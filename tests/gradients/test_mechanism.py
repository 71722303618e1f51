"""The paper's mechanism, pinned by hand computations against dense matrices.

On a small float64 DEQ with a non-symmetric Jacobian, the Broyden matrices ``B_n`` are rebuilt
densely from the solver's own iterates, and the simultaneous adjoint's ``u_n`` and ``G_n`` are
computed by the equations of the method (``docs/method.md``, "The simultaneous adjoint"):

    u_0 = 0,  v_n = J_f(z_n)ᵀ u_n + ∂L(h(z_n))/∂z_n - u_n,  u_{n+1} = u_n - β B_nᵀ v_n,
    G_n = J_{f,x}(z_n)ᵀ u_n (literal pairing)   or   J_{f,x}(z_n)ᵀ u_{n+1} (fresh pairing).

Convergence to the exact gradient alone cannot tell Broyden's ``B_nᵀ`` from the fixed-point
variant's ``-I`` (both converge); these checks and the rate check below can.
"""

from __future__ import annotations

import pytest
import torch

import deqrobust.solvers.tracker as tracker_module
from deqrobust.gradients import cross_entropy_objective, simultaneous_adjoint
from deqrobust.solvers import broyden
from deqrobust.solvers.info import SolverStep, negative_identity

from ..conftest import make_small_deq

DIM, IN_DIM, N_STEPS = 8, 4, 4


def model_and_batch(f_solver: str, scale: float = 0.9):
    model = make_small_deq(dim=DIM, in_dim=IN_DIM, scale=scale, f_solver=f_solver, f_max_iter=N_STEPS, f_tol=0.0,
                           seed=3)
    w = model.f.weight.detach()
    assert (w - w.T).abs().max() > 0.1  # a non-symmetric Jacobian: Bᵀ and B differ
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, IN_DIM, generator=g, dtype=torch.float64)
    return model, x, torch.tensor([0, 2, 1])


def iterates(model, x):
    """The solver's raw iterates z_0..z_N (B, D) for the batch."""
    solve = model.solve(x, trace=True)
    e = model.stem(x).detach()
    return [torch.zeros_like(e)] + solve.info.states, e


def dense_broyden(zs, f):
    """``B_0 = -I``; ``B_{n+1} = B_n + (Δz - B_n Δg)(Δzᵀ B_n) / (Δzᵀ B_n Δg)`` per sample, from the
    iterates alone (a frozen sample, Δz = 0, keeps its B)."""
    bsz, dim = zs[0].shape
    b = -torch.eye(dim, dtype=zs[0].dtype).repeat(bsz, 1, 1)
    mats = [b.clone()]
    for n in range(len(zs) - 1):
        dz = zs[n + 1] - zs[n]
        dg = (f(zs[n + 1]) - zs[n + 1]) - (f(zs[n]) - zs[n])
        for i in range(bsz):
            if dz[i].abs().max() == 0:
                continue
            bdg = b[i] @ dg[i]
            dzb = dz[i] @ b[i]
            b[i] = b[i] + torch.outer(dz[i] - bdg, dzb) / (dzb @ dg[i])
        mats.append(b.clone())
    return mats


def by_hand(model, x, y, inverse_t, beta: float, pairing: str):
    """``G_n`` for n = 1..N from the paper's equations with dense Jacobians and ``inverse_t[n] = B_nᵀ``."""
    zs, e = iterates(model, x)
    bsz = x.shape[0]

    def f(z, e_):
        return model.f(z, e_)

    def loss_grad(z):
        zl = z.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model.head(zl), y, reduction="sum")
        return torch.autograd.grad(loss, zl)[0]

    def jac_z(z):  # (B, D, D): J_f(z) per sample
        return torch.stack([torch.autograd.functional.jacobian(lambda zz: f(zz[None], e[i:i + 1])[0], z[i])
                            for i in range(bsz)])

    def jac_x(z):  # (B, D, IN_DIM): ∂f(z, stem(x))/∂x per sample
        return torch.stack([torch.autograd.functional.jacobian(lambda xx: f(z[i:i + 1], model.stem(xx[None]))[0], x[i])
                            for i in range(bsz)])

    u = [torch.zeros_like(zs[0])]
    for n in range(N_STEPS + 1):
        v = torch.einsum("bij,bi->bj", jac_z(zs[n]), u[n]) + loss_grad(zs[n]) - u[n]
        u.append(u[n] - beta * torch.einsum("bij,bj->bi", inverse_t[n], v))
    grads = {}
    for n in range(1, N_STEPS + 1):
        cot = u[n] if pairing == "literal" else u[n + 1]
        grads[n] = torch.einsum("bij,bi->bj", jac_x(zs[n]), cot)
    return grads


def transposed_b(model, x, f_solver):
    zs, e = iterates(model, x)
    if f_solver != "broyden":  # fixed point and Anderson: B_n = -I (documented)
        eye = -torch.eye(DIM, dtype=x.dtype).repeat(x.shape[0], 1, 1)
        return [eye] * (N_STEPS + 1)
    return [b.transpose(1, 2) for b in dense_broyden(zs, lambda z: model.f(z, e))]


@pytest.mark.parametrize("f_solver", ["broyden", "anderson", "fixed_point"])
@pytest.mark.parametrize("beta", [1.0, 0.7])
@pytest.mark.parametrize("pairing", ["literal", "fresh"])
def test_the_simultaneous_adjoint_is_the_papers_recursion_by_hand(f_solver, beta, pairing):
    model, x, y = model_and_batch(f_solver)
    expected = by_hand(model, x, y, transposed_b(model, x, f_solver), beta, pairing)
    out = simultaneous_adjoint(model, x, cross_entropy_objective(y), states="all", ensemble="uniform", beta=beta,
                               pairing=pairing)
    for n in range(1, N_STEPS + 1):
        assert torch.allclose(out.grads[n], expected[n], rtol=0, atol=1e-10), (n, (out.grads[n] - expected[n]).abs().max())
    assert torch.allclose(out.ensemble, sum(expected.values()) / N_STEPS, rtol=0, atol=1e-10)


def test_the_solver_steps_with_the_dense_broyden_matrices():
    """``z_{n+1} = z_n - B_n g(z_n)`` with the B_n rebuilt above: the matrices are the solver's."""
    model, x, _ = model_and_batch("broyden")
    zs, e = iterates(model, x)
    mats = dense_broyden(zs, lambda z: model.f(z, e))
    for n in range(N_STEPS):
        g = model.f(zs[n], e) - zs[n]
        assert torch.allclose(zs[n + 1], zs[n] - torch.einsum("bij,bj->bi", mats[n], g), atol=1e-12)


def test_rmatvec_is_the_dense_transpose_after_each_update_with_frozen_samples():
    torch.manual_seed(0)
    w = torch.randn(DIM, DIM, dtype=torch.float64)
    w = 0.8 * w / torch.linalg.matrix_norm(w, ord=2)
    c = torch.randn(4, DIM, dtype=torch.float64)
    c[1] = 0.0  # f(0) = 0: sample 1 is at its fixed point after one step and frozen from then on
    c[3] *= 1e-4  # sample 3 converges (and freezes) within a few steps

    def f(z):
        return torch.tanh(z @ w.T + c)

    seen = []
    probe = torch.randn(4, DIM, dtype=torch.float64)

    def callback(step: SolverStep) -> None:
        seen.append((step.z.clone(), step.active.clone(), step.inverse_jacobian_t(probe)))

    broyden(f, torch.zeros(4, DIM, dtype=torch.float64), max_iter=8, tol=1e-9, callback=callback, stop_early=False)
    zs = [z for z, _, _ in seen]
    mats = dense_broyden(zs, f)
    frozen_any = False
    for n, (_, active, applied) in enumerate(seen):
        expected = torch.einsum("bji,bj->bi", mats[n], probe)  # B_nᵀ probe
        assert torch.allclose(applied, expected, rtol=0, atol=1e-10), n
        frozen_any |= bool((~active).any())
    assert frozen_any and not any(active[1] for _, active, _ in seen[1:])  # frozen samples were in the batch


def adjoint_error(n: int, minus_identity: bool, monkeypatch) -> float:
    """Relative error of ``adjoint:n`` against the exact gradient on the contractive test DEQ."""
    model = make_small_deq(scale=0.9, f_max_iter=n, f_tol=0.0)
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    exact = make_small_deq(scale=0.9, grad="exact", f_max_iter=300, f_tol=1e-13)
    xg = x.clone().requires_grad_(True)
    reference = torch.autograd.grad(torch.nn.functional.cross_entropy(exact(xg), y, reduction="sum"), xg)[0]
    if minus_identity:  # the fixed-point variant: the adjoint uses -I instead of Broyden's B_nᵀ
        original = tracker_module.SolverStep
        monkeypatch.setattr(tracker_module, "SolverStep",
                            lambda n_, z, fz, active, _inverse, evaluated: original(n_, z, fz, active, negative_identity,
                                                                                     evaluated))
    g = simultaneous_adjoint(model, x, cross_entropy_objective(y), states=[n]).grads[n]
    monkeypatch.undo()
    return float((g - reference).norm() / reference.norm())


RATE_BOUND = 2e-5  # measured at n = 10: Broyden 2.3e-6, the -I variant 2.6e-4


def test_broyden_makes_the_adjoint_converge_far_faster_than_minus_identity(monkeypatch):
    assert adjoint_error(10, minus_identity=False, monkeypatch=monkeypatch) < RATE_BOUND
    assert adjoint_error(10, minus_identity=True, monkeypatch=monkeypatch) > 10 * RATE_BOUND


def test_the_rate_bound_fails_when_minus_identity_is_patched_in(monkeypatch):
    """The rate check discriminates: with the fixed-point variant in place of B_nᵀ it does not hold."""
    with pytest.raises(AssertionError):
        assert adjoint_error(10, minus_identity=True, monkeypatch=monkeypatch) < RATE_BOUND
