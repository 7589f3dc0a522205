"""train.py's step plan: every run must end on a validation, or its last steps are never saved.

Lightning checkpoints only after a validation (cpu-7 lost its last 238 steps that way), so the
plan must be a whole number of validation intervals, no interval longer than asked for, and
no longer than needed. Training itself never runs in CI; this checks the arithmetic it uses.
"""

from __future__ import annotations

import pytest

from training.train import validation_plan


@pytest.mark.parametrize("planned", [1, 7, 100, 249, 250, 251, 2238, 2736, 6080])
@pytest.mark.parametrize("val_every", [0, 1, 10, 250, 500, 560, 10_000])
def test_plan_ends_on_a_validation(planned: int, val_every: int) -> None:
    interval, max_steps = validation_plan(planned, val_every)
    validations = max_steps // interval
    assert max_steps % interval == 0  # the last step is a validation step
    assert 1 <= interval <= max(1, val_every)  # never validates less often than asked
    assert planned <= max_steps < planned + validations  # grows by fewer steps than validations
    assert validations == -(-planned // max(1, val_every))  # no more validations than asked for


def test_plan_already_on_a_validation_is_kept() -> None:
    assert validation_plan(2000, 500) == (500, 2000)
