"""Lab 3's recipe runner and control rows: sample counts, the teacher-labelled union, the runner's train()."""
import dataclasses

import pytest
import torch

from kdcourse.data import reviews as text
from kdcourse.models.bert import build
from kdcourse.profiles import BertSpec, lab3_settings
from kdcourse.recipes import lab3_controls as rc
from kdcourse.train import predict_logits


@pytest.fixture(scope="module")
def setup():
    data = text.make_data(40, 20, 20, n_teacher_train=60, n_general=50, seed=3)
    cfg = dataclasses.replace(lab3_settings("smoke"), teacher=BertSpec(2, 16, 2, 32), student=BertSpec(1, 8, 2, 16),
                              student_epochs=3, general_epochs=2, batch_size=16)
    torch.manual_seed(0)
    teacher = build(cfg.teacher, data).eval()
    return data, cfg, teacher


def test_sample_counts_and_matched_epochs(setup):
    data, cfg, _ = setup
    assert rc.two_stage_samples(cfg, data) == 2 * 50 + 3 * 40
    assert rc.matched_epochs(cfg, data, 40) == round(220 / 40)  # 6 epochs of the labelled reviews
    assert rc.matched_epochs(cfg, data, 90) == round(220 / 90)
    assert rc.matched_epochs(cfg, data, 10_000) == 1


def test_union_is_train_then_general_labelled_by_the_teacher(setup):
    data, _, teacher = setup
    union = rc.teacher_labelled_union(teacher, data)
    assert len(union) == len(data.train) + len(data.general)
    assert torch.equal(union.input_ids[: len(data.train)], data.train.input_ids)
    assert torch.equal(union.labels[: len(data.train)], data.train.labels)
    assert torch.equal(union.labels[len(data.train):], predict_logits(teacher, data.general).argmax(1))
    assert union.labelled


def test_run_recipe_gives_train_the_right_splits_and_epochs(setup):
    data, cfg, teacher = setup
    seen = []

    def recipe(teacher_, student, train, targets, layer_map, T, alpha):
        from kdcourse.train import Objective, StepOutput

        class NoLabels(Objective):  # the unlabelled split has labels -1
            def forward(self, model, batch, state):
                return StepOutput(model(batch.x).sum() * 0.0, None, {})

        for split, objective in (("general", NoLabels()), ("train", Objective())):
            train(student, split, objective)
            seen.append((split, T, alpha, list(layer_map)))
        return student

    import kdcourse.recipes.lab3_controls as mod
    calls = []
    real_fit = mod.fit
    mod.fit = lambda model, split, objective, **kw: calls.append((split, kw["epochs"], kw["val"] is not None)) or \
        real_fit(model, split, objective, **{**kw, "epochs": 1})
    try:
        run = rc.run_recipe("r", recipe, teacher, data, cfg, seed=0, targets={}, layer_map=[2], progress=False)
    finally:
        mod.fit = real_fit
    assert [(c[1], c[2]) for c in calls] == [(cfg.general_epochs, False), (cfg.student_epochs, True)]
    assert calls[0][0] is data.general and calls[1][0] is data.train
    assert seen == [("general", cfg.T, cfg.alpha, [2]), ("train", cfg.T, cfg.alpha, [2])]
    assert 0 <= run.test_acc <= 1 and run.name == "r"


def test_run_recipe_names_misuse(setup):
    data, cfg, teacher = setup
    with pytest.raises(ValueError, match="split must be one of"):
        rc.run_recipe("r", lambda t, s, train, *a: train(s, "test", None), teacher, data, cfg, seed=0, targets={},
                      layer_map=[2], progress=False)
    with pytest.raises(ValueError, match="must return the student"):
        rc.run_recipe("r", lambda t, s, train, *a: None, teacher, data, cfg, seed=0, targets={}, layer_map=[2],
                      progress=False)
