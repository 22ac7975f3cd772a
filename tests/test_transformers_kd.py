"""BERT teacher/student built offline from a config, the teacher cache and the
KD recipes, all on tiny models and the smoke sizes."""
import os
import warnings

import pytest
import torch

from kdcourse import text
from kdcourse import transformers_kd as tk
from kdcourse.losses import transformer as tl
from kdcourse.train import Distill, fit

TEACHER = tk.BertSpec(4, 32, 2, 64)
STUDENT = tk.BertSpec(2, 16, 2, 32)


@pytest.fixture(scope="module")
def data():
    return text.make_data(96, 32, 32, n_teacher_train=128, n_general=64, seed=1)


@pytest.fixture(scope="module")
def teacher(data):
    torch.manual_seed(0)
    t = tk.build(TEACHER, data, mlm_head=True, tie_mlm=False)
    fit(t, data.teacher_train, tk.TeacherObjective(), epochs=2, lr=3e-3, batch_size=32, progress=False)
    return tk.freeze(t)


def test_offline_and_hf_shapes(data):
    assert os.environ.get("HF_HUB_OFFLINE") == "1" and os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    m = tk.build(STUDENT, data, mlm_head=True).eval()
    x = data.train.input_ids[:5]
    assert m(x).shape == (5, 4)
    out = m.forward_all(x, mlm=True)
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    assert out.hidden_states[0].shape == (5, x.shape[1], 16) and out.attentions[0].shape == (5, 2, x.shape[1], x.shape[1])
    assert out.mlm_logits.shape == (5, x.shape[1], data.vocab_size)
    assert torch.equal(out.attention_mask, x != 0)
    assert torch.allclose(out.logits, m(x))
    # padded keys get zero attention, real rows sum to one
    a = out.attentions[1]
    assert (a.masked_select(~(x != 0)[:, None, None, :]) == 0).all()
    assert torch.allclose(a.sum(-1), torch.ones_like(a.sum(-1)), atol=1e-5)
    # the MLM decoder is tied to the word embeddings
    assert m.mlm.predictions.decoder.weight is m.hf.bert.embeddings.word_embeddings.weight
    with pytest.raises(ValueError, match="input_ids"):
        m(x.float())
    with pytest.raises(ValueError, match="mlm_head"):
        tk.build(STUDENT, data).forward_all(x, mlm=True)


def test_param_counts_with_and_without_embeddings(data):
    m = tk.build(STUDENT, data)
    emb = m.hf.bert.embeddings
    tables = emb.word_embeddings.weight.numel() + emb.position_embeddings.weight.numel() + \
        emb.token_type_embeddings.weight.numel()
    assert tk.count_params(m) == sum(p.numel() for p in m.hf.parameters())
    assert tk.count_params(m, embeddings=False) == tk.count_params(m) - tables
    with_mlm = tk.build(STUDENT, data, mlm_head=True)
    assert tk.count_params(with_mlm) == tk.count_params(m)  # the MLM head is not part of the classifier


def test_bert_spec_validation():
    with pytest.raises(ValueError, match="divisible"):
        tk.BertSpec(2, 30, 4, 64)
    with pytest.raises(ValueError, match="layers"):
        tk.BertSpec(0, 32, 2, 64)
    with pytest.raises(ValueError, match="profile"):
        tk.lab_config("huge")
    for name in ("smoke", "laptop", "full"):
        c = tk.lab_config(name)
        assert c.student.heads == c.teacher.heads and c.student.attention_dropout == 0
        assert c.n_train <= c.n_teacher_train


def test_teacher_objective_trains_a_detached_mlm_head(data):
    torch.manual_seed(0)
    tied = tk.build(TEACHER, data, mlm_head=True)
    with pytest.raises(ValueError, match="tie_mlm=False"):
        fit(tied, data.teacher_train, tk.TeacherObjective(), epochs=1, lr=1e-3, progress=False)
    m = tk.build(TEACHER, data, mlm_head=True, tie_mlm=False).eval()  # eval: no dropout, same forward twice
    obj = tk.TeacherObjective()
    obj.setup(m, data.teacher_train)
    from kdcourse.train import TrainState

    batch = next(data.teacher_train.batches(16))
    out = obj(m, batch, TrainState())
    assert {"ce", "mlm"} <= set(out.parts)
    body = [p for p in m.hf.parameters()]
    g_all = torch.autograd.grad(out.loss, body + [m.mlm.predictions.transform.dense.weight], allow_unused=True)
    g_ce = torch.autograd.grad(torch.nn.functional.cross_entropy(m(batch.x), batch.labels), body, allow_unused=True)
    for a, b in zip(g_all, g_ce):  # the masked-LM term adds nothing to the body's gradient
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)
    assert g_all[-1] is not None and g_all[-1].abs().sum() > 0  # but it trains the head


def test_mask_tokens():
    ids = text.make_data(64, 8, 8).train.input_ids
    g = torch.Generator().manual_seed(0)
    masked, labels = tk.mask_tokens(ids, 60, g, prob=0.15)
    picked = labels != -100
    assert (picked.sum(1) >= 1).all()
    assert not picked[ids < len(text.SPECIALS)].any()  # never [CLS], [SEP] or padding
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(masked[~picked], ids[~picked])
    share_mask = float((masked[picked] == 4).float().mean())
    assert 0.6 < share_mask < 0.95


def test_teacher_targets_equal_live_outputs(data, teacher):
    layers = [0, 2, 4]
    tt = tk.TeacherTargets.compute(teacher, data.train, layers, [2, 4], dtype=torch.float32)
    for b in data.train.batches(32, shuffle=True, generator=torch.Generator().manual_seed(0)):
        got = tt.lookup(b.index, b.x.device, b.x != 0)
        with torch.no_grad():
            live = teacher.forward_all(b.x)
        assert torch.allclose(got.logits, live.logits, atol=1e-5)
        m = (b.x != 0)[..., None]
        for k in layers:
            assert torch.allclose(got.hidden_states[k] * m, live.hidden_states[k] * m, atol=1e-4)
        assert got.hidden_states[1] is None and got.attentions[0] is None
        assert torch.allclose(got.attentions[3], live.attentions[3], atol=1e-5)
    assert tt.nbytes() > 0


def test_layer_distill_trains_student_and_projections_keeps_teacher_frozen(data, teacher):
    torch.manual_seed(0)
    student = tk.build(STUDENT, data)
    obj = tk.LayerDistill(teacher, student, T=2.0, alpha=0.9)
    assert obj.layer_map == [2, 4]
    assert not any(p is q for p in obj.parameters() for q in teacher.parameters())
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_p = obj.projections.hidden.weight.detach().clone()
    hist = fit(student, data.train, obj, epochs=4, lr=3e-3, batch_size=32, progress=False)
    assert {"emb", "hidden", "attn", "pred"} <= set(hist[0])
    assert hist.series("loss")[-1] < hist.series("loss")[0]
    assert not teacher.training and all(torch.equal(v, before_t[k]) for k, v in teacher.state_dict().items())
    assert not torch.equal(before_p, obj.projections.hidden.weight)


def test_layer_distill_accepts_the_students_functions(data, teacher):
    calls = {"hidden": 0, "attn": 0}

    def my_hidden(*args):
        calls["hidden"] += 1
        return tl.hidden_state_loss(*args)

    def my_attention(*args):
        calls["attn"] += 1
        return tl.attention_kl(*args)

    student = tk.build(STUDENT, data)
    obj = tk.LayerDistill(teacher, student, layer_map=lambda s, t: [1, 4], hidden_loss=my_hidden,
                          attention_loss=my_attention)
    assert obj.layer_map == [1, 4]
    fit(student, data.train, obj, epochs=1, lr=1e-3, batch_size=48, progress=False)
    assert calls == {"hidden": 2, "attn": 4}


def test_layer_distill_is_reproducible(data, teacher):
    def once():
        torch.manual_seed(3)
        student = tk.build(STUDENT, data)
        return fit(student, data.train, tk.LayerDistill(teacher, student), epochs=2, lr=1e-3, batch_size=32,
                   seed=3, progress=False).series("loss")

    assert once() == once()


def test_layer_distill_rejects_mismatches(data, teacher):
    with pytest.raises(ValueError, match="heads"):
        tk.LayerDistill(teacher, tk.build(tk.BertSpec(2, 16, 4, 32), data))
    with pytest.raises(ValueError, match="dropout"):
        tk.LayerDistill(teacher, tk.build(tk.BertSpec(2, 16, 2, 32, attention_dropout=0.1), data))
    with pytest.raises(ValueError, match="layer_map"):
        tk.LayerDistill(teacher, tk.build(STUDENT, data), layer_map=[1, 2, 3])
    # without attention, a different head count is fine
    tk.LayerDistill(teacher, tk.build(tk.BertSpec(2, 16, 4, 32), data), w_attention=0.0)


def test_general_stage_uses_no_labels(data, teacher):
    student = tk.build(STUDENT, data)
    obj = tk.LayerDistill(teacher, student, w_prediction=0.0)
    hist = fit(student, data.general, obj, epochs=1, lr=1e-3, batch_size=32, progress=False)
    assert hist[0]["train_acc"] is None and "pred" not in hist[0]


def test_distilbert_objective(data, teacher):
    torch.manual_seed(0)
    student = tk.build(STUDENT, data, mlm_head=True)
    hist = fit(student, data.general, tk.DistilBertObjective(teacher, student), epochs=3, lr=3e-3, batch_size=32,
               progress=False)
    assert {"ce", "mlm", "cos"} <= set(hist[0])
    assert hist.series("loss")[-1] < hist.series("loss")[0]
    with pytest.raises(ValueError, match="mlm_head"):
        tk.DistilBertObjective(teacher, tk.build(STUDENT, data))


def test_two_stage_and_progressive_runs(data, teacher):
    r = tk.two_stage("two", teacher, data, STUDENT, seed=0, general_epochs=1, task_epochs=1, lr=1e-3,
                     batch_size=32, progress=False, task_kwargs={"T": 2.0, "alpha": 0.9})
    assert 0 <= r.test_acc <= 1 and len(r.history) == 2
    r2 = tk.two_stage("two", teacher, data, STUDENT, seed=0, general_epochs=1, task_epochs=1, lr=1e-3,
                      batch_size=32, progress=False, task_kwargs={"T": 2.0, "alpha": 0.9})
    assert r2.test_acc == r.test_acc
    rd = tk.two_stage("distil", teacher, data, STUDENT, seed=0, general="distilbert", general_epochs=1,
                      task_epochs=1, lr=1e-3, batch_size=32, progress=False, keep_model=True)
    assert rd.model is not None and rd.model.mlm is not None
    rp = tk.progressive("prog", teacher, data, STUDENT, seed=0, epochs_per_layer=1, final_epochs=1, lr=1e-3,
                        batch_size=32, progress=False, keep_model=True)
    assert len(rp.history) == STUDENT.layers + 1
    assert all(p.requires_grad for p in rp.model.parameters())
    with pytest.raises(ValueError, match="general"):
        tk.two_stage("x", teacher, data, STUDENT, seed=0, general="bert", general_epochs=1, task_epochs=1, lr=1e-3)


def test_progressive_freezes_all_but_the_current_layer(data, teacher, monkeypatch):
    """Record which student parameters are trainable in each stage."""
    import kdcourse.recipes.lab3 as mod

    seen = []
    real_fit = mod.fit

    def spy(model, split, objective, **kw):
        seen.append({n for n, p in model.named_parameters() if p.requires_grad})
        return real_fit(model, split, objective, **kw)

    monkeypatch.setattr(mod, "fit", spy)
    tk.progressive("prog", teacher, data, STUDENT, seed=0, epochs_per_layer=1, final_epochs=1, lr=1e-3,
                   batch_size=32, progress=False)
    assert all(n.startswith(("hf.bert.embeddings", "hf.bert.encoder.layer.0.")) for n in seen[0])
    assert all(n.startswith("hf.bert.encoder.layer.1.") for n in seen[1]) and seen[1]
    assert len(seen[2]) > len(seen[0]) + len(seen[1])  # the final stage trains everything


def test_teacher_cache_trains_once_and_rebuilds_corrupt_files(tmp_path):
    ds = tk.load_data("smoke")
    t1, info1 = tk.teacher_model("smoke", ds, directory=str(tmp_path), progress=False)
    assert not info1["from_cache"] and os.path.exists(info1["cache_path"])
    t2, info2 = tk.teacher_model("smoke", ds, directory=str(tmp_path), progress=False)
    assert info2["from_cache"] and not t2.training
    assert all(not p.requires_grad for p in t2.parameters())
    for a, b in zip(t1.state_dict().values(), t2.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu())
    assert info2["params"] == tk.count_params(t2)
    path = info1["cache_path"]
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _, info3 = tk.teacher_model("smoke", ds, directory=str(tmp_path), progress=False)
    assert not info3["from_cache"] and any("rebuilding" in str(x.message) for x in w)
    other = text.make_data(300, 200, 300, n_teacher_train=600, n_general=600, seed=5)
    assert tk._teacher_key(tk.lab_config("smoke"), other, 0)[1] != tk._teacher_key(tk.lab_config("smoke"), ds, 0)[1]


def test_prediction_kd_with_distill_works_on_text(data, teacher):
    student = tk.build(STUDENT, data)
    hist = fit(student, data.train, Distill(teacher, T=2.0, alpha=0.9), epochs=1, lr=1e-3, batch_size=32,
               progress=False)
    assert hist[0]["kd"] > 0


def test_size_and_speed_uses_deploy_latency_and_restores_threads(data):
    t, m = tk.build(STUDENT, data), tk.build(tk.BertSpec(1, 16, 2, 32), data)
    before = torch.get_num_threads()
    r = tk.size_and_speed(t, m, data.test.input_ids[:8], repeats=3, warmup=1, threads=1, rounds=2)
    assert r["p50_ms"][0] > 0 and r["p50_ms"][1] > 0 and r["threads"] == 1 and r["batch"] == (8, data.max_len)
    assert r["params"] == (tk.count_params(t), tk.count_params(m)) and r["params"][0] > r["params"][1]
    assert torch.get_num_threads() == before


def test_lab3_objectives_follow_T_and_alpha_schedules(data, teacher):
    """T and alpha may be schedules f(progress) for the Lab 3 objectives too,
    resolved every step as for Distill (they used to be passed raw)."""
    seen = []

    def T(p):
        seen.append(p)
        return 1.0 + p

    student = tk.build(STUDENT, data)
    hist = fit(student, data.train, tk.LayerDistill(teacher, student, T=T, alpha=lambda p: 0.5), epochs=1, lr=1e-3,
               batch_size=64, progress=False)
    steps = data.train.num_batches(64)
    assert len(seen) == steps and seen[0] == 0.0 and 0 < seen[-1] < 1 and hist[0]["pred"] > 0
    s2, t2 = tk.build(STUDENT, data, mlm_head=True), tk.build(tk.BertSpec(2, 16, 2, 32), data, mlm_head=True)
    seen.clear()
    fit(s2, data.general, tk.DistilBertObjective(t2, s2, T=T), epochs=1, lr=1e-3, batch_size=64, progress=False)
    assert len(seen) == data.general.num_batches(64)
