"""The fixed-point study's bookkeeping (benchmarks/fixed_point_study.py): the table it prints for
docs/fixed-point-study.md and the setting names it accepts. The trainings themselves are the study."""

from __future__ import annotations

import pytest

from benchmarks import fixed_point_study as study


def row(setting: str, **extra) -> dict:
    return {"setting": setting, "overrides": list(study.SETTINGS[setting][1]), "train_wall_time": 541.6,
            "train_residual_per_epoch": [None, None, 0.1894, 0.2942], "dev_clean_acc": 0.98, "dev_robust_acc": 0.805,
            **extra}


def test_the_table_shows_the_latest_row_of_each_setting_with_its_gap():
    evaluated = row("exact-nojac-4-3-20ep", test_rel_residual_mean_per_state=[1.0, 0.9763, 0.4829, 0.2925],
                    min_rel_residual_after_state_0=0.2925, clean=98.33, ready_made_exact=84.72, worst_case=79.44, gap=5.28)
    lines = study.table([row("exact-nojac-4-3-20ep"), evaluated, row("exact-nojac-20ep")]).splitlines()
    assert len(lines) == 4  # header, rule, one line per setting
    first, second = lines[2], lines[3]
    assert first.startswith("| exact-nojac-20ep |") and "not evaluated" in first  # SETTINGS order
    assert "| 0.189 → 0.294 |" in second and "| 0.292 (0.292) |" in second
    assert second.endswith("| 98.33 | 84.72 | 79.44 | 5.28 |")


def test_an_unknown_setting_is_an_error_naming_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as exit_:
        study.main(["--only", "exact-nojac-2ep"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unknown setting(s) exact-nojac-2ep" in err and "exact-nojac-20ep" in err
