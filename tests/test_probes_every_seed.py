"""Every exercise's probe works for any seed the grader may draw.

The grader probes each exercise on its declared hidden seeds and on fresh
ones from ``secrets`` in [1000, 2**31 + 1000) (kdcourse.grading.grade._seeds).
A probe that fails for some seeds (a size drawn at the edge of a range, an
empty ``torch.randint`` interval) would cost a correct answer its points on
an unlucky run, so the reference answer is probed here on seeds spread over
that whole range: each must give plain data the grader can read, the same
data twice (the grader compares a student's and the reference's runs of one
seed), and agree with itself under the exercise's own comparison."""
from __future__ import annotations

import glob
import json
import os

import pytest

from kdcourse.checks import contract

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEMS = sorted(os.path.basename(p)[:-6] for p in glob.glob(os.path.join(ROOT, "solutions", "*.ipynb")))
EXERCISES = [(stem, e.name) for stem in STEMS for e in contract.exercises_for(stem) if e.reference is not None]

LOW, HIGH = 1000, 2 ** 31 + 1000  # the grader's fresh seeds: secrets.randbelow(2**31) + 1000
# the range's two ends, its first seeds, and seeds spread over it by the
# golden-ratio step (2**31 / phi): no two land close together
SEEDS = [LOW, LOW + 1, LOW + 2, LOW + 3, HIGH - 1, HIGH - 2] + [LOW + (k * 1_327_217_885) % (HIGH - LOW)
                                                               for k in range(1, 20)]
# probes that cost 0.15-0.65 s each (a two-stage BERT run, a timed model, a
# quantized network; measured with contract.run_probe): their first seeds only
COSTLY = {"two_stage_kd": 4, "latency_ms": 4, "quantize_student": 4}


def _plain(data):
    return contract.validate(json.loads(json.dumps(data)))


@pytest.mark.parametrize("stem,name", EXERCISES)
def test_the_reference_probe_works_on_seeds_across_the_graders_range(stem, name):
    ex = contract.exercise(stem, name)
    seeds = list(ex.hidden_seeds) + SEEDS[: COSTLY.get(name, len(SEEDS))]
    data = {}
    for seed in seeds:
        try:
            data[seed] = _plain(contract.run_probe(ex, ex.reference, seed))
        except Exception as exc:  # noqa: BLE001 - the seed is what the report needs
            pytest.fail(f"{stem} {name}: the probe fails on seed {seed}: {type(exc).__name__}: {exc}")
    assert contract.diagnose_data(ex, data, data).ok
    again = seeds[-1]
    assert contract.diagnose_data(ex, {again: _plain(contract.run_probe(ex, ex.reference, again))},
                                  {again: data[again]}).ok, f"{name}: the probe is not repeatable on seed {again}"


def test_the_costly_list_names_declared_exercises():
    names = {n for _s, n in EXERCISES}
    assert set(COSTLY) <= names, set(COSTLY) - names
