"""Self-distillation methods on tiny problems: the teacher generation stays
frozen, aux heads do not change the backbone's output, peers exchange
gradients only through their own parameters, ensembles average what they say."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdcourse import data as D
from kdcourse import models, profiles, runs
from kdcourse import selfdistill as sd
from kdcourse.data import Batch
from kdcourse.losses.mutual import mutual_learning_losses
from kdcourse.train import TrainState, fit, freeze

SPEC = {"arch": "cnn", "widths": (4, 8, 8)}


@pytest.fixture(scope="module")
def tiny():
    return D.shapes(96, 32, 48, seed=5)


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g), torch.arange(n))


# ---- ensembles ------------------------------------------------------------

def test_ensemble_teacher_modes():
    members = [models.build(SPEC).eval() for _ in range(3)]
    x = _batch().x
    with torch.no_grad():
        zs = [m(x) for m in members]
        by_logits = sd.EnsembleTeacher(members, "logits")(x)
        by_probs = sd.EnsembleTeacher(members, "probs", T=3.0)(x)
    assert torch.allclose(by_logits, torch.stack(zs).mean(0), atol=1e-6)
    want = torch.stack([torch.softmax(z / 3.0, 1) for z in zs]).mean(0)
    assert torch.allclose(torch.softmax(by_probs / 3.0, 1), want, atol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        sd.EnsembleTeacher(members, "median")
    with pytest.raises(ValueError, match="empty"):
        sd.EnsembleTeacher([])


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_ensemble_distill_targets_and_frozen_members(mode, tiny):
    members = [models.build(SPEC) for _ in range(2)]
    before = [copy.deepcopy(m.state_dict()) for m in members]
    obj = sd.ensemble_distill(members, mode=mode, T=4.0, alpha=0.7)
    fit(models.build(SPEC), tiny.train, obj, epochs=1, lr=1e-2, progress=False)
    for m, b in zip(members, before):
        assert not m.training and all(not p.requires_grad for p in m.parameters())
        assert all(torch.equal(b[k], v) for k, v in m.state_dict().items())
    # the cached targets are the members' average (of logits, or of probabilities at T)
    with torch.no_grad():
        zs = [m(tiny.train.images) for m in members]
    target = torch.softmax(obj._cached / 4.0, 1)
    want = torch.softmax(torch.stack(zs).mean(0) / 4.0, 1) if mode == "logits" else \
        torch.stack([torch.softmax(z / 4.0, 1) for z in zs]).mean(0)
    assert torch.allclose(target, want, atol=1e-5)


# ---- born-again networks -----------------------------------------------------

def test_teacher_generation_stays_frozen_while_the_next_trains(tiny):
    snapshots = []

    def watching_loop(new_model, train, temperatures, alpha):
        def watched(model, objective):
            teacher = getattr(objective, "teacher", None)
            before = copy.deepcopy(teacher.state_dict()) if teacher is not None else None
            train(model, objective)
            if teacher is not None:
                snapshots.append((before, teacher))
        return sd.born_again(new_model, watched, temperatures, alpha)

    res = sd.run_born_again(SPEC, tiny, seeds=(0,), temperatures=(2.0, 4.0), epochs=2, lr=1e-2,
                            loop=watching_loop, progress=False)
    assert len(snapshots) == 2
    for before, teacher in snapshots:
        assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
        assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # BN buffers too
    gens = res.models(0)
    assert snapshots[0][1] is gens[0] and snapshots[1][1] is gens[1]
    # three different networks of the same architecture
    assert len({id(m) for m in gens}) == 3
    assert not torch.equal(gens[0].fc.weight, gens[1].fc.weight)
    assert {models.count_params(m) for m in gens} == {models.count_params(models.build(SPEC))}


def test_generation_one_is_the_scratch_run_and_results_are_reproducible(tiny):
    kw = dict(seeds=(3,), temperatures=(4.0,), epochs=2, lr=1e-2, progress=False)
    a = sd.run_born_again(SPEC, tiny, **kw)
    b = sd.run_born_again(SPEC, tiny, **kw)
    scratch = runs.train_run("scratch", SPEC, tiny, epochs=2, lr=1e-2, seed=3, progress=False)
    assert a.runs[0][0].test_acc == scratch.test_acc
    assert a.runs[0][0].history.series("loss") == scratch.history.series("loss")
    assert [r[0].test_acc for r in a.runs] == [r[0].test_acc for r in b.runs]
    assert a.runs[1][0].history[0]["T"] == 4.0
    rows = a.table_rows()
    assert [r["model"] for r in rows][:2] == ["generation 1", "generation 2"] and "ensemble" in rows[2]["model"]


def test_reusing_scratch_runs_as_generation_one_changes_nothing(tiny):
    kw = dict(seeds=(0, 1), temperatures=(4.0,), epochs=2, lr=1e-2, progress=False)
    scratch = runs.repeat("scratch", (0,), build=SPEC, data=tiny, epochs=2, lr=1e-2, progress=False, keep_model=True)
    fresh = sd.run_born_again(SPEC, tiny, **kw)
    reused = sd.run_born_again(SPEC, tiny, reuse=scratch, **kw)
    assert [[r.test_acc for r in g] for g in fresh.runs] == [[r.test_acc for r in g] for g in reused.runs]
    assert reused.runs[0][0].history is scratch[0].history and reused.runs[0][0].model is not scratch[0].model
    with pytest.raises(ValueError, match="keep_model"):
        sd.run_born_again(SPEC, tiny, reuse=runs.repeat("s", (0,), build=SPEC, data=tiny, epochs=1, lr=1e-2, progress=False), **kw)


def test_ensemble_of_generations_is_measured(tiny):
    res = sd.run_born_again(SPEC, tiny, seeds=(0, 1), temperatures=(4.0, 4.0), epochs=1, lr=1e-2,
                            ensemble_mode="probs", progress=False)
    assert len(res.ensembles) == 2 and all(len(e) == 2 for e in res.ensembles)
    ens = res.ensembles[1][0].model
    assert isinstance(ens, sd.EnsembleTeacher) and len(ens.members) == 3 and ens.mode == "probs"
    acc = sd.evaluate(ens, tiny.test)["acc"]
    assert acc == res.ensembles[1][0].test_acc
    assert res.ensemble(3).n == 2 and 0 <= res.ensemble(3).mean <= 1


def test_run_born_again_rejects_bad_loops_and_arguments(tiny):
    kw = dict(seeds=(0,), epochs=1, lr=1e-2, progress=False)
    with pytest.raises(ValueError, match="must return 3 generations"):
        sd.run_born_again(SPEC, tiny, temperatures=(4.0, 4.0), loop=lambda *a: sd.born_again(*a)[:2], **kw)
    with pytest.raises(ValueError, match="never trained"):
        sd.run_born_again(SPEC, tiny, temperatures=(4.0,), loop=lambda nm, tr, Ts, a: [nm(), nm()], **kw)
    with pytest.raises(ValueError, match="temperatures"):
        sd.run_born_again(SPEC, tiny, temperatures=(), **kw)
    with pytest.raises(ValueError, match="ensemble_mode"):
        sd.run_born_again(SPEC, tiny, temperatures=(4.0,), ensemble_mode="vote", **kw)


# ---- deep supervision -----------------------------------------------------------

@pytest.mark.parametrize("spec", [SPEC, {"arch": "resnet", "depth": 8, "width": 4}, {"arch": "mobile", "widths": (4, 8, 8), "blocks": 1}])
def test_aux_heads_do_not_change_the_backbone(spec):
    torch.manual_seed(0)
    plain = models.build(spec)
    torch.manual_seed(0)
    backbone = models.build(spec)
    wrapped = sd.DeepSupervision(backbone, exits=("layer1", "layer2"))
    # same initial weights as an unwrapped backbone, and not one parameter added to it
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), backbone.state_dict().values()))
    assert models.count_params(backbone) == models.count_params(plain)
    x = _batch().x
    for mode in ("train", "eval"):
        getattr(plain, mode)()
        getattr(wrapped, mode)()
        assert torch.equal(wrapped(x), plain(x))
        assert torch.equal(wrapped.exits_logits(x)["final"], plain(x))
    out = wrapped.exits_logits(x)
    assert list(out) == ["layer1", "layer2", "final"] and all(v.shape == (6, 10) for v in out.values())


def test_hooks_path_for_a_plain_backbone_leaves_no_hooks():
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, 2, 1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    wrapped = sd.DeepSupervision(backbone, exits=("1", "3"))
    x = _batch().x
    out = wrapped.exits_logits(x)
    assert set(out) == {"1", "3", "final"} and out["1"].shape == (6, 5)
    assert torch.equal(out["final"], backbone(x)) and torch.equal(wrapped(x), backbone(x))
    assert all(not m._forward_hooks for m in backbone.modules())
    with pytest.raises(ValueError, match="not submodules"):
        sd.DeepSupervision(backbone, exits=("layer9",))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        sd.DeepSupervision(backbone, exits=("5",))


def test_deep_supervision_bad_exits():
    with pytest.raises(ValueError, match="empty"):
        sd.DeepSupervision(models.build(SPEC), exits=())
    with pytest.raises(ValueError, match="not among"):
        sd.DeepSupervision(models.build(SPEC), exits=("layer7",))
    with pytest.raises(ValueError, match="pool"):
        sd.DeepSupervision(models.build(SPEC), exits=("pool",))
    with pytest.raises(ValueError, match="reserved"):
        sd.DeepSupervision(models.build(SPEC), exits=("final",))


def test_deepest_head_teaches_the_shallow_ones_without_being_taught():
    torch.manual_seed(0)
    model = sd.DeepSupervision(models.build(SPEC), exits=("layer1", "layer2"))
    batch = _batch(8)
    obj = sd.ExitDistillation(T=3.0, alpha=0.8)
    out = obj(model, batch, TrainState())
    fc = model.backbone.fc
    (g_total,) = torch.autograd.grad(out.loss, fc.weight)
    final = model.exits_logits(batch.x)["final"]
    (g_ce,) = torch.autograd.grad(F.cross_entropy(final, batch.labels), fc.weight)
    assert torch.allclose(g_total, g_ce, atol=1e-6)  # the KL terms do not reach the final head
    # ... but they do reach the shallow heads and the backbone below them
    head = model.heads["layer1"].fc.weight
    (g_head,) = torch.autograd.grad(obj(model, batch, TrainState()).loss, head)
    assert g_head.abs().sum() > 0
    assert set(out.parts) == {"ce_final", "exit_layer1", "exit_layer2"}
    with pytest.raises(ValueError, match="DeepSupervision"):
        obj.setup(models.build(SPEC), None)


def test_run_deep_supervision_measures_every_exit(tiny):
    res = sd.run_deep_supervision(SPEC, tiny, seeds=(0,), epochs=1, lr=1e-2, progress=False)
    assert set(res.acc) == {"layer1", "layer2", "final", "all exits"}
    assert all(0 <= v[0] <= 1 for v in res.acc.values())
    assert res.acc["final"][0] == pytest.approx(res.runs[0].test_acc)  # evaluation uses the backbone's own output
    assert res.backbone_params == models.count_params(models.build(SPEC))
    accs = sd.exit_accuracies(res.runs[0].model, tiny.test)
    assert accs == {k: v[0] for k, v in res.acc.items()}


# ---- deep mutual learning -----------------------------------------------------------

def test_peers_exchange_gradients_only_through_their_own_parameters():
    torch.manual_seed(0)
    peers = nn.ModuleList([models.build(SPEC) for _ in range(3)])
    batch = _batch(8)
    obj = sd.MutualLearning(T=2.0, alpha=0.7)
    out = obj(peers, batch, TrainState())
    params = [list(p.parameters()) for p in peers]
    g_total = torch.autograd.grad(out.loss, [q for ps in params for q in ps])
    logits = [p(batch.x) for p in peers]
    per = mutual_learning_losses(logits, batch.labels, T=2.0, alpha=0.7)
    offset = 0
    for k, ps in enumerate(params):
        own = torch.autograd.grad(per[k], [q for qs in params for q in qs], retain_graph=True, allow_unused=True)
        n = len(ps)
        # peer k's parameters get exactly the gradient of its own loss ...
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_total[offset:offset + n], own[offset:offset + n]))
        # ... and its loss sends nothing into the other peers' parameters
        assert all(g is None or not g.any() for i, g in enumerate(own) if not offset <= i < offset + n)
        offset += n


def test_independent_peers_are_the_scratch_run(tiny):
    # alpha = 0: the peers do not talk; peer 1 is exactly the seed's scratch run
    res = sd.run_mutual(SPEC, tiny, seeds=(2,), peers=2, alpha=0.0, epochs=2, lr=1e-2, progress=False)
    scratch = runs.train_run("scratch", SPEC, tiny, epochs=2, lr=1e-2, seed=2, progress=False, keep_model=True)
    assert res.peer_acc[0][0] == scratch.test_acc
    assert all(torch.equal(a, b) for a, b in zip(res.runs[0].model[0].state_dict().values(), scratch.model.state_dict().values()))


def test_mutual_learning_changes_peers_and_reports(tiny):
    res = sd.run_mutual(SPEC, tiny, seeds=(0, 1), peers=3, T=1.0, alpha=0.5, epochs=1, lr=1e-2, progress=False)
    assert len(res.peer_acc) == 2 and len(res.peer_acc[0]) == 3
    assert res.mean_peer().n == 2 and res.peer(2).n == 2 and res.ensemble().params == 3 * res.peer_params
    hist = res.runs[0].history
    assert {"ce_peer0", "ce_peer1", "ce_peer2"} <= set(hist[0])


def test_mutual_learning_predict_and_errors():
    peers = nn.ModuleList([models.build(SPEC).eval() for _ in range(2)])
    x = _batch().x
    assert torch.equal(sd.MutualLearning(eval_peer=1).predict(peers, x), peers[1](x))
    assert torch.allclose(sd.MutualLearning(eval_peer="ensemble").predict(peers, x), (peers[0](x) + peers[1](x)) / 2)
    with pytest.raises(ValueError, match="ModuleList"):
        sd.MutualLearning().setup(models.build(SPEC), None)
    with pytest.raises(ValueError, match="only 2 peers"):
        sd.MutualLearning(eval_peer=2).setup(peers, None)
    with pytest.raises(ValueError, match="eval_peer"):
        sd.MutualLearning(eval_peer="best")
    with pytest.raises(ValueError, match="peers"):
        sd.run_mutual(SPEC, None, seeds=(0,), peers=1, epochs=1, lr=1e-2)


def test_mutual_learning_uses_a_students_loss(tiny):
    seen = []

    def my_loss(peer_logits, labels, T=1.0, alpha=0.5):
        seen.append((len(peer_logits), T, alpha))
        return sum(F.cross_entropy(z, labels) for z in peer_logits)

    fit(nn.ModuleList([models.build(SPEC) for _ in range(2)]), tiny.train, sd.MutualLearning(T=2.0, alpha=0.3, loss=my_loss),
        epochs=1, progress=False)
    assert seen and seen[0] == (2, 2.0, 0.3)


# ---- settings and readouts --------------------------------------------------------

@pytest.mark.parametrize("name", ["smoke", "laptop", "full"])
def test_settings_for_every_profile(name):
    s = sd.settings(profiles.get_profile(name))
    assert s.epochs >= 1 and s.lr > 0 and s.generations >= 2 and all(T > 0 for T in s.sweep_T)
    assert 0 <= s.alpha <= 1 and s.exits


def test_temperature_sweep_rows(tiny):
    teacher = freeze(models.build(SPEC))
    rows = sd.temperature_sweep(teacher, SPEC, tiny, (1.0, 8.0), alpha=0.5, epochs=1, lr=1e-2, progress=False)
    assert [r["T"] for r in rows] == [1.0, 8.0]
    assert rows[0]["entropy_bits"] < rows[1]["entropy_bits"] <= 3.33  # softer at high T, at most log2(10)
    assert all(0 <= r["val_acc"] <= 1 and 0 <= r["test_acc"] <= 1 for r in rows)


def test_lab_data_matches_the_profile_splits():
    prof = profiles.get_profile("smoke")
    mine, full = sd.lab_data(prof), D.load(prof)
    assert len(mine.train) == prof.n_train and len(mine.teacher_train) == prof.n_train
    assert torch.equal(mine.test.images, full.test.images) and torch.equal(mine.val.labels, full.val.labels)


def test_per_seed_differences():
    a, b = sd.summary_of("a", [0.8, 0.9]), sd.summary_of("b", [0.7, 0.95])
    assert sd.per_seed(a, b) == "a − b, seed by seed: +10.00, -5.00 points"
    with pytest.raises(ValueError, match="same seeds"):
        sd.per_seed(a, sd.summary_of("c", [0.1]))


def test_label_noise(tiny):
    noisy = sd.with_label_noise(tiny, 0.5, seed=1)
    changed = (noisy.train.labels != tiny.train.labels).float().mean()
    assert 0.2 < changed < 0.65  # half resampled, a tenth of those land on the true class
    assert torch.equal(noisy.test.labels, tiny.test.labels) and torch.equal(noisy.train.images, tiny.train.images)
    assert sd.with_label_noise(tiny, 0.0) is tiny
    with pytest.raises(ValueError, match="fraction"):
        sd.with_label_noise(tiny, 1.5)


def test_significance_readout():
    a = sd.summary_of("a", [0.80, 0.81, 0.82])
    b = sd.summary_of("b", [0.80, 0.805, 0.81])
    assert "within seed-to-seed noise" in sd.significance(a, b)
    c = sd.summary_of("c", [0.90, 0.905, 0.91])
    assert "gain above noise" in sd.significance(c, b)
    assert "loss above noise" in sd.significance(b, c)
    with pytest.raises(ValueError, match="no values"):
        sd.summary_of("empty", [])
    one = sd.summary_of("one", [0.95])
    assert sd.verdict(one, b).startswith("one run: more than 2 std above")
    assert sd.verdict(sd.summary_of("one", [0.806]), b) == "one run: within 2 std of the baseline"
    row = sd.compare_row(c, b, anchor="paper: 1 → 2")
    assert row["reading"] == "gain above noise" and row["Δ vs scratch (points)"] == "+10.00" and row["seeds"] == 3
    assert sd.compare_row(b, b)["reading"] == "baseline"


def test_benchmark_prints_epoch_ratios_in_smoke(capsys):
    from kdcourse.benchmarks import lab4

    assert lab4.main("smoke", repeats=1, only=("epoch",)) == 0
    out = capsys.readouterr().out
    assert "mutual learning (2 peers)" in out and "ratio to labels only 1.00" in out
