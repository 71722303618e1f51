"""Solvers: same fixed point, raw-iterate traces, per-sample independence, divergence, bad options."""

from __future__ import annotations

import pytest
import torch

from deqrobust.solvers import SOLVERS, KeepStates, RunningMean, anderson, get_solver

from ..conftest import ContractiveF


def make_f(dim=8, batch=5, scale=0.7, seed=1):
    f_mod = ContractiveF(dim, scale, seed).double()
    e = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    with torch.no_grad():
        return (lambda z: f_mod(z, e)), e


def reference_fixed_point(f, batch, dim):
    z = torch.zeros(batch, dim, dtype=torch.float64)
    for _ in range(500):
        z = f(z)
    return z


@pytest.mark.parametrize("name", list(SOLVERS))
def test_solvers_reach_the_long_fixed_point_iteration(name):
    f, e = make_f()
    z_ref = reference_fixed_point(f, *e.shape)
    z, info = get_solver(name)(f, torch.zeros_like(e), max_iter=100, tol=1e-11, stop_mode="abs")
    assert torch.allclose(z, z_ref, atol=1e-9)
    assert bool(info.converged.all()) and not bool(info.diverged.any())
    assert info["abs_lowest"].max() < 1e-11


def test_acceleration_needs_fewer_steps_than_plain_iteration():
    f, e = make_f(scale=0.95)
    steps = {n: get_solver(n)(f, torch.zeros_like(e), max_iter=300, tol=1e-8)[1].nstep.max().item() for n in SOLVERS}
    assert steps["broyden"] < steps["fixed_point"] and steps["anderson"] < steps["fixed_point"]


@pytest.mark.parametrize("name", list(SOLVERS))
def test_trace_returns_raw_iterates_not_best_so_far(name):
    f, e = make_f()
    z, info = get_solver(name)(f, torch.zeros_like(e), max_iter=6, tol=0.0, trace=True)
    states = info.states
    assert len(states) == 6
    # The first step of every solver is z_1 = f(z_0).
    assert torch.allclose(states[0], f(torch.zeros_like(e)))
    # Raw iterates: the recorded residual of state n is the residual of states[n-1] itself.
    for n, zn in enumerate(states, start=1):
        res = torch.linalg.vector_norm(f(zn) - zn, dim=1)
        assert torch.allclose(res, info.abs_trace[:, n], rtol=1e-9, atol=1e-12)
    # The returned iterate is the lowest-residual one.
    best = info.lowest_step
    for i in range(e.shape[0]):
        assert torch.equal(z[i], states[best[i] - 1][i])


def test_fixed_point_trace_is_plain_iteration():
    f, e = make_f()
    _, info = get_solver("fixed_point")(f, torch.zeros_like(e), max_iter=4, tol=0.0, trace=True)
    z = torch.zeros_like(e)
    for zn in info.states:
        z = f(z)
        assert torch.equal(zn, z)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_per_sample_independence(name):
    f_mod = ContractiveF(10, 0.9, 3).double()
    e = torch.randn(32, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    e[5] *= 30.0  # a hard sample: slower to converge than its neighbours
    solver = get_solver(name)
    with torch.no_grad():
        z_all, info_all = solver(lambda z: f_mod(z, e), torch.zeros_like(e), max_iter=25, tol=1e-6, trace=True)
        for i in (0, 5, 31):
            ei = e[i : i + 1]
            z_one, info_one = solver(lambda z: f_mod(z, ei), torch.zeros_like(ei), max_iter=25, tol=1e-6, trace=True)
            assert torch.allclose(z_one[0], z_all[i], atol=1e-12, rtol=0)
            for s_one, s_all in zip(info_one.states, info_all.states):
                assert torch.allclose(s_one[0], s_all[i], atol=1e-12, rtol=1e-12)  # float64 roundoff of batched BLAS
            assert info_one.nstep[0] == info_all.nstep[i]
            assert torch.allclose(info_one.rel_trace[0], info_all.rel_trace[i], atol=1e-12)


def test_per_sample_stopping_freezes_converged_samples():
    f, e = make_f(batch=4)
    e2 = e.clone()
    z, info = get_solver("fixed_point")(f, torch.zeros_like(e), max_iter=200, tol=1e-4, trace=True)
    n_stop = info.nstep
    assert (n_stop < 200).all()
    for i in range(4):
        frozen = info.states[int(n_stop[i]) - 1][i]
        assert torch.equal(info.states[-1][i], frozen)
        assert info.rel_trace[i, int(n_stop[i])] < 1e-4
    assert torch.equal(e, e2)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_divergence_and_nan_are_reported_per_sample(name):
    def f(z):
        out = torch.tanh(z) * 0.5 + 0.1
        out[1] = 1.0 if bool((z[1] == 0).all()) else float("inf")  # blows up after the first step
        out[2] = out[2] + float("nan")  # NaN straight away
        return out

    z, info = get_solver(name)(f, torch.zeros(4, 3, dtype=torch.float64), max_iter=40, tol=1e-8)
    assert info.diverged.tolist() == [False, True, True, False]
    assert not info.converged[1] and not info.converged[2]
    assert info.converged[0] and info.converged[3]
    assert torch.isfinite(z[[0, 3]]).all()


def test_growing_residual_is_divergence():
    f = lambda z: 3.0 * z + 1.0  # repelling fixed point: plain iteration runs away
    _, info = get_solver("fixed_point")(f, torch.zeros(2, 3, dtype=torch.float64), max_iter=30, tol=1e-8)
    assert info.diverged.all() and info.nstep.max() < 30


def test_early_stop_pads_states_so_reducers_do_not_depend_on_the_batch():
    f, e = make_f(batch=3)
    mean = RunningMean()
    keep = KeepStates([10])
    _, info = get_solver("broyden")(f, torch.zeros_like(e), max_iter=10, tol=1e-3, callback=[mean, keep], trace=True)
    assert info.nstep.max() < 10  # the loop stopped early ...
    assert len(info.states) == 10 and mean.count == 10  # ... and the remaining states are reported
    assert torch.allclose(mean.mean(), torch.stack(info.states).mean(0))
    assert torch.equal(keep.states[10], info.states[-1])


def test_shorter_solve_reproduces_first_states_exactly():
    f, e = make_f(batch=3, scale=0.95)
    _, long = get_solver("broyden")(f, torch.zeros_like(e), max_iter=12, tol=0.0, trace=True)
    _, short = get_solver("broyden")(f, torch.zeros_like(e), max_iter=5, tol=0.0, trace=True)
    for a, b in zip(short.states, long.states):
        assert torch.equal(a, b)


def test_bad_options_and_names_give_clear_errors():
    f, e = make_f()
    with pytest.raises(ValueError, match="unknown solver 'newton'.*broyden"):
        get_solver("newton")
    with pytest.raises(ValueError, match="unknown option.*'memroy'.*valid options: memory"):
        get_solver("broyden")(f, torch.zeros_like(e), memroy=3)
    with pytest.raises(ValueError, match="stop_mode"):
        get_solver("anderson")(f, torch.zeros_like(e), stop_mode="relative")
    with pytest.raises(ValueError, match="flattened states"):
        get_solver("fixed_point")(f, torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="max_iter"):
        get_solver("fixed_point")(f, torch.zeros_like(e), max_iter=0)
    assert set(get_solver("broyden")(f, torch.zeros_like(e), max_iter=2)[1].keys()) >= {
        "nstep", "abs_trace", "rel_trace", "abs_lowest", "rel_lowest"
    }


def _rates_map(rates: torch.Tensor):
    """Per-sample linear contraction z -> a_i z + 1: sample i converges at its own speed."""
    return lambda z: rates.view(-1, 1) * z + 1.0


def test_anderson_survives_samples_frozen_longer_than_its_history():
    # Sample 0 converges in a few steps and stays frozen for far more than m steps while sample 1
    # still runs: its history becomes all zeros, which must not make the mixing system singular.
    rates = torch.tensor([0.01, 0.9])
    freq = torch.arange(1, 7.0)

    def f(z):
        return rates.view(-1, 1) * torch.cos(z * freq) + 1.0

    z, info = anderson(f, torch.zeros(2, 6), max_iter=60, tol=1e-6, m=3)
    assert info.converged.tolist() == [True, False] and info.nstep.tolist() == [4, 60]
    assert torch.isfinite(z).all() and torch.isfinite(info.abs_trace).all()
    alone, _ = anderson(lambda v: rates[:1].view(-1, 1) * torch.cos(v * freq) + 1.0, torch.zeros(1, 6),
                        max_iter=60, tol=1e-6, m=3)
    assert torch.equal(z[0], alone[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_anderson_at_an_exact_fixed_point_stays_there(dtype):
    f = _rates_map(torch.tensor([0.5, 0.5], dtype=dtype))
    z0 = torch.full((2, 4), 2.0, dtype=dtype)  # f(z0) == z0 exactly
    z, info = anderson(f, z0, max_iter=12, tol=0.0, stop_early=False, m=4)
    assert torch.equal(z, z0) and torch.isfinite(info.abs_trace).all()
