"""Input entropy reduction: the chunked solve with a purified input, against hand-written loops."""

from __future__ import annotations

import pytest
import torch

from deqrobust.attackable import EstimatorSettings, attackable, surrogate_gradient
from deqrobust.defenses import Defense, EntropyReduction, defended_forward, defended_logits, defended_logits_many, purify_input
from deqrobust.defenses.entropy import purified_solve
from deqrobust.errors import ConfigError
from deqrobust.gradients import GradientSource, cross_entropy_objective
from deqrobust.gradients.objective import CotangentObjective
from deqrobust.solvers import broyden
from deqrobust.solvers.broyden import BroydenState

from ..conftest import make_small_deq

EPS = 0.1


def hand_entropy_steps(model, z, x, x0, steps, step, radius):
    """R signed steps on the input lowering each example's entropy at the fixed state z."""
    for _ in range(steps):
        leaf = x.clone().requires_grad_(True)
        logits = model.head(model.f(z, model.stem(leaf)))
        p = torch.softmax(logits, dim=1)
        entropy = -(p * torch.log(p)).sum()
        (grad,) = torch.autograd.grad(entropy, leaf)
        x = x - step * torch.sign(grad)
        x = torch.max(torch.min(x, x0 + radius), x0 - radius).clamp(0.0, 1.0)
    return x.detach()


def hand_broyden_defense(model, x0, n_read, chunk, steps, step, radius):
    """The defense written out with a dense inverse Jacobian B (never more rank-one terms than
    the memory here, so no ring buffer), the lift as a rank-one secant update."""
    dim = model.f.weight.shape[0]
    bsz = x0.shape[0]
    x = x0.clone()
    e = model.stem(x)
    z = torch.zeros(bsz, dim, dtype=x0.dtype)
    b = -torch.eye(dim, dtype=x0.dtype).expand(bsz, dim, dim).clone()

    def g(z, e):
        return model.f(z, e) - z

    def update(b, dz, dg):
        b_dg = torch.einsum("bij,bj->bi", b, dg)
        dz_b = torch.einsum("bi,bij->bj", dz, b)
        denom = (dz_b * dg).sum(1, keepdim=True)
        return b + torch.einsum("bi,bj->bij", (dz - b_dg) / denom, dz_b)

    gz, last, states = g(z, e), None, {}
    with torch.no_grad():
        for n in range(1, n_read + 1):
            z_new = z - torch.einsum("bij,bj->bi", b, gz)
            g_new = g(z_new, e)
            last = (z_new - z, g_new - gz)
            b = update(b, *last)
            z, gz = z_new, g_new
            states[n] = z
            if n % chunk == 0 and n < n_read:
                with torch.enable_grad():
                    x = hand_entropy_steps(model, z, x, x0, steps, step, radius)
                e = model.stem(x)
                g_lifted = g(z, e)
                lifted = update(b, last[0], last[1] + g_lifted - gz)
                informative = last[0].norm(dim=1) >= (g_lifted - gz).norm(dim=1)  # else the lift is skipped
                b = torch.where(informative[:, None, None], lifted, b)
                gz = g_lifted
    return x, states


def test_the_defense_equals_a_hand_written_loop():
    model = make_small_deq(f_max_iter=8, scale=0.9)
    x = torch.rand(5, 4, dtype=torch.float64)
    purified, states = hand_broyden_defense(model, x, n_read=7, chunk=2, steps=3, step=EPS / 4, radius=EPS)
    defense = f"entropy(steps=3,radius={EPS},memory=16):early:7"
    out = defended_forward(model, x, defense)
    assert torch.allclose(out.purified, purified, atol=1e-12)
    assert torch.allclose(out.states[7], states[7], atol=1e-10)
    assert torch.allclose(out.logits, model.head(states[7]), atol=1e-10)
    assert not torch.allclose(purified, x)  # the purification moved the input


def test_the_fixed_point_solver_defense_equals_a_hand_written_loop():
    model = make_small_deq(f_solver="fixed_point", f_max_iter=6, scale=0.9)
    x = torch.rand(4, 4, dtype=torch.float64)
    x0, xp = x, x.clone()
    z = torch.zeros(4, 6, dtype=torch.float64)
    with torch.no_grad():
        for n in range(1, 7):
            z = model.f(z, model.stem(xp))
            if n % 3 == 0 and n < 6:
                with torch.enable_grad():
                    xp = hand_entropy_steps(model, z, xp, x0, 4, 0.02, EPS)
    out = defended_forward(model, x, f"entropy(chunk=3,steps=4,step=0.02,radius={EPS}):final")
    assert torch.allclose(out.purified, xp, atol=1e-12)
    assert torch.allclose(out.logits, model.head(model.f(z, model.stem(xp))), atol=1e-10)


def test_the_purification_stays_in_the_ball_and_lowers_the_entropy():
    model = make_small_deq(f_max_iter=8, scale=0.9, in_dim=4)
    x = torch.rand(16, 4, dtype=torch.float64)
    x_purified = purify_input(model, x, f"entropy(radius={EPS})")
    assert float((x_purified - x).abs().max()) <= EPS + 1e-12
    assert float(x_purified.min()) >= 0.0 and float(x_purified.max()) <= 1.0
    static = torch.softmax(defended_logits(model, x, "early:7"), 1)
    defended = torch.softmax(defended_logits(model, x, f"entropy(radius={EPS})"), 1)
    entropy = [-(p * p.log()).sum(1) for p in (static, defended)]
    assert float(entropy[1].mean()) < float(entropy[0].mean())


def test_the_chunked_solve_reaches_the_fixed_point_of_a_fresh_solve_at_the_purified_input():
    model = make_small_deq(f_max_iter=40, scale=0.8)
    x = torch.rand(6, 4, dtype=torch.float64)
    purify = EntropyReduction(chunk=10, steps=5, radius=EPS, memory=10)
    out = purified_solve(model, x, purify, 40, {40})
    fresh = model.solve(x=out.purified, max_iter=60)
    assert torch.allclose(out.z_last, fresh.z_star, atol=1e-8)
    # without the purification's input change the state would be another input's fixed point
    assert not torch.allclose(model.solve(x=x, max_iter=60).z_star, fresh.z_star, atol=1e-4)


def test_broyden_state_steps_are_broydens_iterates_and_a_retarget_keeps_converging():
    torch.manual_seed(0)
    a = 0.5 * torch.randn(5, 5, dtype=torch.float64) / 5 ** 0.5
    z0 = torch.zeros(3, 5, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ a.T + 1.0)  # noqa: E731
    run = BroydenState(f, z0, memory=6)
    ours = [run.step() for _ in range(6)]
    _, info = broyden(f, z0, max_iter=6, tol=0.0, trace=True, stop_early=False)
    for mine, theirs in zip(ours, info.states):
        assert torch.allclose(mine, theirs, atol=1e-12)
    g = lambda z: torch.tanh(z @ a.T + 0.5)  # noqa: E731
    run.retarget(g)
    for _ in range(25):
        z = run.step()
    assert float((g(z) - z).abs().max()) < 1e-6


def test_a_purified_defense_in_a_shared_solve_equals_its_own():
    model = make_small_deq(f_max_iter=8, scale=0.9)
    x = torch.rand(5, 4, dtype=torch.float64)
    names = ["final", f"entropy(radius={EPS})", "early:3", f"entropy(steps=2,radius={EPS}):final"]
    for name, logits in zip(names, defended_logits_many(model, x, names)):
        assert torch.equal(logits, defended_logits(model, x, name))


def test_names_and_defaults():
    defense = Defense.parse("entropy", n_states=8)
    assert (defense.kind, defense.step, defense.purify) == ("early", 7, EntropyReduction())
    resolved = defense.resolved(8 / 255)
    assert resolved.purify.radius == 8 / 255 and resolved.purify.step_size == 2 / 255
    assert Defense.parse(str(resolved), n_states=8) == resolved  # the name round-trips exactly
    assert Defense.parse("ENTROPY(Steps=4):Final", n_states=8).purify.steps == 4
    assert resolved.static == Defense("early", 7)
    assert EntropyReduction(chunk=2, steps=10).purification_steps(7) == 30


@pytest.mark.parametrize("name, words", [
    ("entropy(steps=0)", "steps must be a positive integer"),
    ("entropy(steps=-3)", "steps must be a positive integer"),
    ("entropy(chunk=0)", "chunk must be a positive integer"),
    ("entropy(step=-0.01)", "step must be a number in (0, 1]"),
    ("entropy(radius=-8/255)", "radius must be a number in (0, 1]"),
    ("entropy(radius=0)", "radius must be a number in (0, 1]"),
    ("entropy(stpes=3)", "unknown option 'stpes=3'"),
    ("entropi", "invalid defense 'entropi'"),
    ("entropy:ensemble", "reads final or early:<n>"),
    ("entropy:early:9", "invalid defense"),
    ("entropy(steps=3", "closing parenthesis"),
])
def test_bad_settings_are_named(name, words):
    with pytest.raises(ConfigError) as err:
        Defense.parse(name, n_states=8)
    assert words in str(err.value)


def test_a_solver_without_a_chunked_form_and_a_missing_radius_are_named():
    x = torch.rand(2, 4, dtype=torch.float64)
    with pytest.raises(ConfigError, match="f_solver is 'anderson'"):
        defended_logits(make_small_deq(f_solver="anderson", f_max_iter=8), x, "entropy(radius=0.1)")
    with pytest.raises(ConfigError, match="needs a radius"):
        defended_logits(make_small_deq(f_max_iter=8), x, "entropy")


@pytest.mark.parametrize("source", ["exact", "phantom", "adjoint:7", "unrolled:7", "unrolled:ensemble"])
def test_bpda_gradient_is_the_sources_gradient_at_the_purified_input(source):
    model = make_small_deq(f_max_iter=8, scale=0.9)
    x = torch.rand(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    defense = f"entropy(radius={EPS})"
    leaf = x.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(attackable(model, defense, source)(leaf), y, reduction="sum")
    (bpda,) = torch.autograd.grad(loss, leaf)
    purified = purify_input(model, x, defense)
    # the source's vector-Jacobian product, at the purified input, with the incoming cotangent
    logits = defended_logits(model, x, defense).requires_grad_(True)
    (cotangent,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y, reduction="sum"), logits)
    settings = EstimatorSettings()
    parsed = GradientSource.parse(source, 8)
    expected = surrogate_gradient(model, purified, parsed, CotangentObjective(cotangent), settings)
    assert torch.allclose(bpda, expected, atol=1e-12)
    at_received = surrogate_gradient(model, x, parsed, CotangentObjective(cotangent), settings)
    assert not torch.allclose(bpda, at_received, atol=1e-6)  # not the gradient at the received input


def protocol_setting():
    """A small DEQ, a batch, the protocol's attack runner, the purified defense and a source."""
    from deqrobust.attacks import ThreatModel
    from deqrobust.evaluate.runner import AttackRunner
    from deqrobust.evaluate.state import EvalState
    model = make_small_deq(f_max_iter=8, scale=0.9)
    x = torch.rand(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    runner = AttackRunner(model, ThreatModel("Linf", EPS), 0, EvalState(None, {}))
    return model, x, y, runner, Defense.parse(f"entropy(radius={EPS})", 8), GradientSource.parse("unrolled:7", 8)


def test_the_protocols_pgd_gradient_against_a_purified_defense_is_taken_at_the_purified_input():
    from deqrobust.evaluate.suites import AttackSpec
    model, x, y, runner, defense, source = protocol_setting()
    spec = AttackSpec("pgd", steps=2)
    grad = runner.grad_fn(spec, source, defense)(x, y)
    expected = surrogate_gradient(model, purify_input(model, x, defense), source, cross_entropy_objective(y),
                                  EstimatorSettings())
    assert torch.allclose(grad, expected, atol=1e-12)
    assert not runner.shareable(spec, source, [defense, Defense("early", 7)])  # never on a static trajectory
    assert runner.shareable(spec, source, [Defense("final"), Defense("early", 7)])


def test_the_protocols_non_adaptive_pgd_gradient_never_runs_the_purification(purifications):
    from deqrobust.evaluate.suites import AttackSpec
    model, x, y, runner, defense, source = protocol_setting()
    grad = runner.grad_fn(AttackSpec("pgd", steps=2), source, defense, "non-adaptive")(x, y)
    assert purifications["n"] == 0  # neither run nor differentiated
    at_received = surrogate_gradient(model, x, source, cross_entropy_objective(y), EstimatorSettings())
    assert torch.allclose(grad, at_received, atol=1e-12)  # the undefended model's gradient at the received input
    at_purified = surrogate_gradient(model, purify_input(model, x, defense), source, cross_entropy_objective(y),
                                     EstimatorSettings())
    assert not torch.allclose(grad, at_purified, atol=1e-6)


def cotangent_of_ce(model, x, y, defense):
    logits = defended_logits(model, x, defense).requires_grad_(True)
    return torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y, reduction="sum"), logits)[0]


def input_gradient(model, x, y, defense, source, purification):
    leaf = x.clone().requires_grad_(True)
    wrapped = attackable(model, defense, source, purification=purification)
    loss = torch.nn.functional.cross_entropy(wrapped(leaf), y, reduction="sum")
    return torch.autograd.grad(loss, leaf)[0]


@pytest.mark.parametrize("source", ["phantom", "unrolled:7"])
def test_the_non_adaptive_gradient_never_runs_nor_differentiates_the_defense(source, purifications):
    model = make_small_deq(f_max_iter=8, scale=0.9)
    x = torch.rand(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    defense = f"entropy(radius={EPS})"
    calls = purifications
    leaf = x.clone().requires_grad_(True)
    logits = attackable(model, defense, source, purification="non-adaptive")(leaf)
    forward_calls = calls["n"]
    assert forward_calls == 3  # the forward is the defended one: 3 purifications before z_7
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y, reduction="sum"), leaf)
    assert calls["n"] == forward_calls  # the backward never ran the purification
    expected = surrogate_gradient(model, x, GradientSource.parse(source, 8),
                                  CotangentObjective(cotangent_of_ce(model, x, y, defense)), EstimatorSettings())
    assert torch.allclose(grad, expected, atol=1e-12)  # the undefended model's gradient at the received input


def test_through_the_loop_raw_is_bpda_where_no_pixel_meets_the_range():
    model = make_small_deq(f_max_iter=8, scale=0.9)
    x = 0.3 + 0.4 * torch.rand(5, 4, dtype=torch.float64)  # x ± 0.1 stays inside [0, 1]
    y = torch.tensor([0, 1, 2, 0, 1])
    defense = f"entropy(radius={EPS})"
    bpda = input_gradient(model, x, y, defense, "phantom", "bpda")
    raw = input_gradient(model, x, y, defense, "phantom", "through-loop:raw")
    assert torch.allclose(raw, bpda, atol=1e-12)
    # a pixel the [0, 1] range holds at 0 or 1 passes no gradient back; the others pass BPDA's
    x_edge = x.clone()
    x_edge[:, :2] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    raw_edge = input_gradient(model, x_edge, y, defense, "phantom", "through-loop:raw")
    bpda_edge = input_gradient(model, x_edge, y, defense, "phantom", "bpda")
    purified = purify_input(model, x_edge, defense)
    held = (purified == 0.0) | (purified == 1.0)
    assert bool(held.any()) and bool((~held).any())
    assert torch.all(raw_edge[held] == 0.0)
    assert torch.allclose(raw_edge[~held], bpda_edge[~held], atol=1e-12)


def test_through_the_loop_straight_through_adds_the_entropy_hessian():
    """One purification of one step (read at z_2): x' = clip(x - s sign ∇H(x)), so the
    straight-through Jacobian is I - s ∇²H(x) where no bound is met; its VJP is checked by hand."""
    model = make_small_deq(f_max_iter=2, scale=0.9)
    x = 0.3 + 0.4 * torch.rand(3, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    step = 0.02
    defense = f"entropy(chunk=1,steps=1,step={step},radius={EPS}):early:2"
    st = input_gradient(model, x, y, defense, "phantom", "through-loop:straight-through")
    bpda = input_gradient(model, x, y, defense, "phantom", "bpda")
    z1 = model.solve(x, max_iter=1).z_star  # the state the entropy is read at

    def entropy_at(inputs):
        logits = model.head(model.f(z1, model.stem(inputs)))
        p = torch.softmax(logits, dim=1)
        return -(p * p.log()).sum()

    _, hvp = torch.autograd.functional.hvp(entropy_at, x, bpda)
    assert torch.allclose(st, bpda - step * hvp, atol=1e-10)
    assert not torch.allclose(st, bpda, atol=1e-8)


def test_a_purification_gradient_needs_a_purified_defense():
    model = make_small_deq(f_max_iter=8)
    with pytest.raises(ConfigError, match="needs a purified defense"):
        attackable(model, "early:3", "phantom", purification="non-adaptive")
    with pytest.raises(ConfigError, match="unknown purification gradient 'bdpa'"):
        attackable(model, "entropy(radius=0.1)", "phantom", purification="bdpa")


def test_the_confident_loss_is_cross_entropy_minus_the_entropy():
    from deqrobust.attacks.pgd import confident_cross_entropy_sum
    from deqrobust.evaluate.suites import AttackSpec

    logits = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    p = torch.softmax(logits, dim=1)
    expected = torch.nn.functional.cross_entropy(logits, y, reduction="sum") + (p * p.log()).sum()
    assert torch.allclose(confident_cross_entropy_sum(logits, y), expected)
    assert AttackSpec("pgd", steps=10, loss="ce-confident").label == "pgd10-confident"
    with pytest.raises(ConfigError, match="unknown loss"):
        AttackSpec("apgd-ce", loss="ce-confident")
