"""The evaluation state: what identifies an evaluation, and the wall time it keeps across processes."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest

from deqrobust.errors import ConfigError
from deqrobust.evaluate.state import STATE_VERSION, EvalState, UnitResult, model_identity

MODEL = {"class": "DEQClassifier", "checkpoint": "/runs/a/best.safetensors", "tensor_sha256": "ab12"}


def write_state(path, fingerprint, meta=None):
    path.write_text(json.dumps({"version": STATE_VERSION, "fingerprint": fingerprint, "units": {}, "meta": meta or {}}))


def test_a_state_written_with_the_checkpoints_path_resumes_from_another_path(tmp_path):
    path = tmp_path / "eval_state.json"
    write_state(path, {"model": MODEL, "seed": 0}, {"wall_s": 12.5})  # as states were written before model_identity
    state = EvalState(path, {"model": model_identity(dict(MODEL, checkpoint="b/best.safetensors")), "seed": 0})
    assert state.earlier_wall_s == 12.5


def test_other_weights_are_another_evaluation(tmp_path):
    path = tmp_path / "eval_state.json"
    write_state(path, {"model": model_identity(MODEL), "seed": 0})
    with pytest.raises(ConfigError, match="differs in: model"):
        EvalState(path, {"model": model_identity(dict(MODEL, tensor_sha256="cd34")), "seed": 0})


def test_without_a_weights_hash_the_path_still_names_the_model():
    assert model_identity({"class": "Net", "checkpoint": "a.pt"}) == {"class": "Net", "checkpoint": "a.pt"}


@pytest.mark.parametrize("wall", ["12", -1.0, math.inf, True, None])
def test_a_state_whose_wall_time_is_not_seconds_is_refused(tmp_path, wall):
    path = tmp_path / "eval_state.json"
    write_state(path, {"seed": 0}, {"wall_s": wall})
    text = path.read_text().replace("Infinity", "1e999")  # json writes inf as Infinity; 1e999 reads back as inf
    path.write_text(text)
    with pytest.raises(ConfigError, match="wall_s"):
        EvalState(path, {"seed": 0})


def test_each_save_keeps_the_wall_time_of_every_process_so_far(tmp_path):
    path = tmp_path / "eval_state.json"
    first = EvalState(path, {"seed": 0}, started=0.0)  # a process that started long ago (perf_counter 0)
    first.put("test/final/pgd10/p0", asdict(UnitResult(seconds=1.0)))
    kept = json.loads(path.read_text())["meta"]["wall_s"]
    second = EvalState(path, {"seed": 0})
    assert second.earlier_wall_s == kept > 0
    assert kept <= second.wall_s() < kept + 5.0
