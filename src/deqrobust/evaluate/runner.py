"""Runs one attack with one gradient source against one defense on the examples still to be
attacked (packed into batches, so a cascade costs in proportion to its survivors), judging success
on the real defended output."""

from __future__ import annotations

import time
import warnings
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..attackable import EstimatorSettings, PurificationGradient, surrogate_gradient
from ..attacks import SharedPGD, ThreatModel
from ..attacks.steps import misclassified
from ..defenses import Defense, defended_logits_many, purify_input
from ..gradients import GradientSource, cross_entropy_objective
from ..utils.seeding import derive_seed
from .state import EvalState, UnitResult
from .suites import AttackSpec
from .target import AttackTarget


def percent(mask: Tensor) -> float:
    """Share of True entries in percent, from exact integer counts."""
    return 100.0 * int(mask.sum()) / mask.numel() if mask.numel() else 0.0


def predictions_ok(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(correct, non-finite) per example; non-finite logits are never correct."""
    return ~misclassified(logits, y), ~torch.isfinite(logits).all(dim=1)


def defense_free_gradient(is_deq: bool, adjoint_variant: str, spec: AttackSpec, source: Optional[GradientSource],
                          defense: Optional[Defense] = None) -> bool:
    """Whether the attack's gradient never reads the defense: our PGD with an intermediate-state
    estimator in its paper-exact form (the loss at every state, :func:`~deqrobust.attackable.surrogate_gradient`).
    Such runs against different defenses follow one trajectory and can share it. Never against a
    purified defense: its gradient is taken at the purified input (BPDA), which the defense decides."""
    return (is_deq and spec.algorithm == "pgd" and spec.loss == "ce" and source is not None and not source.is_ready_made
            and adjoint_variant == "loss" and (defense is None or defense.purify is None))


class AttackRunner:
    """Shared context of an evaluation: the model (seen through its :class:`AttackTarget`), the
    threat model, seeding, batching and the resumable state."""

    def __init__(
        self,
        model: nn.Module,
        threat: ThreatModel,
        seed: int,
        state: EvalState,
        batch_size: int = 128,
        settings: Optional[EstimatorSettings] = None,
        adjoint_variant: str = "loss",
        progress: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.model, self.threat, self.seed, self.state = model, threat, seed, state
        self.target = AttackTarget(model)
        self.batch_size, self.settings = batch_size, settings or EstimatorSettings()
        self.adjoint_variant, self.progress = adjoint_variant, progress
        self.rank, self.world_size = rank, world_size
        self.n_classes = 0  # known after the first clean pass
        self.overall: Optional[tqdm] = None  # the evaluation's overall progress bar (one step per attack run)
        self.executed: list[str] = []  # the key of every attack run, in order (a key asked for again: once)
        # With keep_points (``evaluate(..., return_adversarial=True)``): per run key, the point that
        # broke each example at the evaluation's radius, until the test phase takes it.
        self.keep_points = False
        self.points: dict[str, dict[int, Tensor]] = {}

    # ------------------------------------------------------------------ models
    def logits(self, x: Tensor, defense: Union[str, Defense]) -> Tensor:
        return self.target.logits(x, defense)

    def attack_model(self, defense: Union[str, Defense], source: Optional[GradientSource],
                     purification: PurificationGradient = "bpda") -> Callable[[Tensor], Tensor]:
        return self.target.attack_model(defense, source, self.settings, purification)

    def shareable(self, spec: AttackSpec, source: Optional[GradientSource], defenses: Sequence[Defense] = ()) -> bool:
        """Whether runs of ``spec`` with ``source`` against ``defenses`` can share one trajectory:
        PGD with a gradient that never reads the defense (:func:`defense_free_gradient`)."""
        free = defense_free_gradient(self.target.deq is not None, self.adjoint_variant, spec, source)
        return free and all(d.purify is None for d in defenses)

    def example_seeds(self, spec: AttackSpec, key: str, defense: Union[str, Defense], sel: Tensor) -> Optional[Tensor]:
        """PGD's per-example start seeds: from the run's key without its defense and the example's
        index, so runs that differ only in defense start every example at the same point."""
        if spec.algorithm != "pgd":
            return None
        stream = key.replace(f"/{defense}/", "/", 1)
        return torch.tensor([derive_seed(self.seed, stream, i) for i in sel.tolist()], dtype=torch.long)

    def grad_fn(self, spec: AttackSpec, source: Optional[GradientSource], defense: Optional[Defense] = None,
                purification: PurificationGradient = "bpda"):
        """The paper-exact variant for our PGD: the attack's CE evaluated at every state; against a
        purified defense at the purified input (BPDA) or, non-adaptive, at the received input.
        Through the loop: none (the attack model's backward differentiates the purification)."""
        deq = self.target.deq
        if deq is None or source is None or not defense_free_gradient(True, self.adjoint_variant, spec, source):
            return None
        if defense is not None and defense.purify is not None and purification != "non-adaptive":
            if purification != "bpda":
                return None
            return lambda x, y: surrogate_gradient(deq, purify_input(deq, x, defense), source, cross_entropy_objective(y),
                                                   self.settings)
        return lambda x, y: surrogate_gradient(deq, x, source, cross_entropy_objective(y), self.settings)

    # ------------------------------------------------------------------ batching
    def batches(self, n: int) -> list[tuple[int, Tensor]]:
        """This rank's share of the global batches over all ``n`` examples (batch b goes to rank b mod world)."""
        out = []
        for b, start in enumerate(range(0, n, self.batch_size)):
            if b % self.world_size == self.rank:
                out.append((b, torch.arange(start, min(start + self.batch_size, n))))
        return out

    def packed(self, todo: Tensor) -> list[tuple[int, Tensor]]:
        """This rank's share of the examples still to attack, packed into evenly sized batches.

        Only the ``todo`` examples are batched, so a cascade pays for its survivors, not for every
        example: 1,000 survivors of 10,000 make 8 batches of 125, not 79 mostly empty ones. The
        number of batches is a multiple of the world size (every process gets the same share) and
        each holds at most ``batch_size`` examples. The packing depends only on ``todo``, which a
        resumed run rebuilds exactly, so unit keys stay valid across restarts.
        """
        idx = todo.nonzero().flatten()
        if idx.numel() == 0:
            return []
        count = -(-idx.numel() // self.batch_size)
        count = min(-(-count // self.world_size) * self.world_size, idx.numel())
        return [(b, part) for b, part in enumerate(torch.tensor_split(idx, count)) if b % self.world_size == self.rank]

    def bar(self, runs: int, n: int, desc: str) -> tqdm:
        """A progress bar over ``runs`` attack runs on at most ``n`` examples each, counted in examples."""
        return tqdm(total=runs * self.bar_share(n), desc=desc, disable=not self.progress, leave=False, unit="ex")

    def bar_share(self, n: int) -> int:
        """Progress-bar units (examples) one run over ``n`` examples counts on this rank: never less
        than this rank's packed examples, as the batches are spread evenly."""
        return -(-n // self.world_size)

    def gather(self, local: UnitResult) -> UnitResult:
        if self.world_size == 1:
            return local
        from ..distributed import all_gather_object

        total = UnitResult()
        for part in all_gather_object(local):
            total.merge(part)
        total.broken.sort()
        total.nonfinite.sort()
        return total

    # ------------------------------------------------------------------ running
    def run(
        self,
        key: str,
        defense: Union[str, Defense],
        spec: AttackSpec,
        source: Optional[GradientSource],
        x: Tensor,
        y: Tensor,
        todo: Tensor,
        threat: Optional[ThreatModel] = None,
        bar: Optional[tqdm] = None,
        purification: PurificationGradient = "bpda",
    ) -> UnitResult:
        """Attack the examples where ``todo`` is True; return which were broken (global indices).
        ``purification``: how a gradient against a purified defense treats the purification."""
        threat = threat or self.threat
        shared = self.state.get(f"{key}/shared")
        if shared is not None:  # run by run_shared with other defenses: its result is global already
            if bar is not None:
                bar.update(self.bar_share(len(y)))
            self.log(key)
            return UnitResult(**shared)
        local = UnitResult()
        model_a = None
        shown = 0
        for b, sel in self.packed(todo):
            unit_key = f"{key}/p{b}"
            saved = self.state.get(unit_key)
            if saved is None:
                result = UnitResult(attacked=int(sel.numel()))
                start = time.perf_counter()
                if model_a is None:
                    model_a = self.attack_model(defense, source, purification)
                attack = spec.build(model_a, threat, derive_seed(self.seed, unit_key),
                                    self.grad_fn(spec, source, Defense.parse(defense, self.target.n_states), purification),
                                    self.example_seeds(spec, key, defense, sel))
                attack.check_labels = False  # checked once for the evaluation (inputs.check_call)
                with warnings.catch_warnings():
                    # AutoAttack's zero-gradient warning: our own gradient check reports it.
                    warnings.filterwarnings("ignore", message=r"there are \d+ points with zero gradient")
                    x_adv = attack(x[sel], y[sel])
                ok, nonfinite = predictions_ok(self.logits(x_adv, defense), y[sel])
                result.broken = sel[~ok].tolist()
                if self.keep_points and threat == self.threat:
                    self.points.setdefault(key, {}).update(zip(result.broken, x_adv[~ok].detach().cpu()))
                result.nonfinite = sel[nonfinite].tolist()
                stats = getattr(attack, "grad_stats", None) or {}
                result.grad_computed = stats.get("computed", 0)
                result.grad_zero = stats.get("zero", 0)
                result.grad_nonfinite = stats.get("nonfinite", 0)
                result.seconds = time.perf_counter() - start
                self.state.put(unit_key, result.__dict__)
                saved = result.__dict__
            local.merge(UnitResult(**saved))
            if bar is not None:
                bar.update(int(sel.numel()))
                shown += int(sel.numel())
        if bar is not None:
            bar.update(self.bar_share(len(y)) - shown)  # the examples not attacked count as done
        self.log(key)
        return self.gather(local)

    def log(self, key: str) -> None:
        if key not in self.executed:
            self.executed.append(key)
            if self.overall is not None:
                self.overall.update(1)

    def run_shared(self, runs: list[tuple[str, Defense, Tensor]], spec: AttackSpec, source: GradientSource, x: Tensor,
                   y: Tensor) -> None:
        """Run ``(key, defense, todo)`` runs of one shareable attack (:meth:`shareable`) as one
        trajectory on the union of their examples, judged on every defense from one solve; each
        run's result equals :meth:`run`'s and is stored so that :meth:`run` then returns it."""
        runs = [r for r in runs if self.state.get(f"{r[0]}/shared") is None]
        if len(runs) < 2:
            return  # nothing to share: run() runs it alone
        if self.target.deq is None or not self.shareable(spec, source, [d for _, d, _ in runs]):
            raise ValueError(f"{spec.label} with {source} cannot share a trajectory across defenses")
        deq, defenses = self.target.deq, [d for _, d, _ in runs]
        wanted_all = torch.stack([todo for _, _, todo in runs], dim=1)
        locals_ = [UnitResult() for _ in runs]
        grad_fn = self.grad_fn(spec, source)
        for b, sel in self.packed(wanted_all.any(dim=1)):
            unit_keys = [f"{key}/shared/p{b}" for key, _, _ in runs]
            found = [self.state.get(k) for k in unit_keys]
            saved: list[dict] = [u for u in found if u is not None]
            if len(saved) < len(found):
                start = time.perf_counter()
                wanted = wanted_all[sel]
                attack = SharedPGD(lambda v: defended_logits_many(deq, v, defenses), wanted, self.threat,
                                   steps=spec.steps, alpha=spec.alpha * self.threat.eps, restarts=spec.restarts,
                                   grad_fn=grad_fn, example_seeds=self.example_seeds(spec, runs[0][0], defenses[0], sel),
                                   keep_points=self.keep_points)
                attack.check_labels = False
                attack(x[sel], y[sel])
                if self.keep_points and attack.points is not None:
                    for j, (key, _, _) in enumerate(runs):
                        rows = attack.broken[:, j].nonzero().flatten()
                        self.points.setdefault(key, {}).update(zip(sel[rows].tolist(), attack.points[rows, j].cpu()))
                stats = attack.grad_stats or {}
                seconds = (time.perf_counter() - start) / len(runs)
                saved = []
                for j, k in enumerate(unit_keys):
                    result = UnitResult(broken=sel[attack.broken[:, j]].tolist(), nonfinite=sel[attack.nonfinite[:, j]].tolist(),
                                        attacked=int(wanted[:, j].sum()), grad_computed=stats.get("computed", 0),
                                        grad_zero=stats.get("zero", 0), grad_nonfinite=stats.get("nonfinite", 0),
                                        seconds=seconds)
                    self.state.put(k, result.__dict__)
                    saved.append(result.__dict__)
            for part, unit in zip(locals_, saved):
                part.merge(UnitResult(**unit))
        for (key, _, _), part in zip(runs, locals_):
            self.state.put(f"{key}/shared", self.gather(part).__dict__)

    def clean(self, defense: Union[str, Defense], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(correct, non-finite) masks over all examples; also sets ``n_classes`` (the logits' width)."""
        correct = torch.zeros(len(y), dtype=torch.bool)
        nonfinite = torch.zeros(len(y), dtype=torch.bool)
        parts = []
        for _, idx in self.batches(len(y)):
            logits = self.logits(x[idx], defense)
            ok, bad = predictions_ok(logits, y[idx])
            parts.append((idx.tolist(), ok.tolist(), bad.tolist(), int(logits.shape[1])))
        if self.world_size > 1:
            from ..distributed import all_gather_object

            shards = all_gather_object(parts)
        else:
            shards = [parts]
        for shard in shards:
            for idx, ok, bad, classes in shard:
                correct[idx] = torch.tensor(ok)
                nonfinite[idx] = torch.tensor(bad)
                self.n_classes = max(self.n_classes, classes)
        return correct, nonfinite
