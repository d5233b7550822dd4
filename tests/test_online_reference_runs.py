"""The online loop computes what it computed before it became an explicit pipeline (see reference_runs.py)."""

from __future__ import annotations

import json
import math

import pytest

import reference_runs


@pytest.mark.parametrize("name", reference_runs.NAMES)
def test_seeded_run_logs_the_reference_loss_reward_and_kl(name):
    expected = json.loads(reference_runs.PATH.read_text())[name]
    got = reference_runs.run(name)
    assert len(got) == len(expected) == 10
    for step, (g, e) in enumerate(zip(got, expected)):
        for key, value in e.items():
            if key not in reference_runs.COMPARED:
                continue
            key = reference_runs.RENAMED.get((name, key), key)
            assert key in g, (step, key)
            assert math.isclose(g[key], value, rel_tol=2e-3, abs_tol=2e-4), (name, step, key, g[key], value)
