"""The one teacher-output memo (kdcourse.teacher_cache): logits, named
features and a BERT teacher's hidden states / attentions share one keying rule;
what it serves equals a fresh eval-mode pass bit for bit; a teacher whose
weights change in place (trained further, or a student that becomes the next
teacher) is never served stale outputs; the old names still work."""
import torch
import torch.nn.functional as F

from kdcourse import data, teacher_cache, text
from kdcourse import transformers_kd as tk
from kdcourse.distill.transformer import TeacherTargets
from kdcourse.models import ResNet
from kdcourse.train import clear_logit_memo, fit, freeze, memo_logits, predict_logits


def _image():
    torch.manual_seed(0)
    return data.shapes(n_train=48, n_val=16, n_test=16, seed=5), ResNet(8, 4).eval()


def _fresh_pass(teacher, split, batch_size, layer):
    """The independent oracle: a hand-written eval-mode pass with a forward hook."""
    got = {}
    h = dict(teacher.named_modules())[layer].register_forward_hook(lambda m, i, o: got.__setitem__("f", o))
    logits, feats = [], []
    with torch.no_grad():
        for b in split.batches(batch_size):
            logits.append(teacher(b.x).float())
            feats.append(got["f"].float())
    h.remove()
    return torch.cat(logits), torch.cat(feats)


def test_cached_outputs_equal_a_fresh_eval_pass_exactly_and_are_shared():
    teacher_cache.clear_teacher_cache()
    ds, teacher = _image()
    teacher.train()  # the memo switches to eval mode for its pass and back
    logits, f = teacher_cache.teacher_outputs(teacher, ds.train, ["layer2"])
    assert teacher.training
    teacher.eval()
    ref_logits, ref_f = _fresh_pass(teacher, ds.train, 256, "layer2")
    assert torch.equal(logits, ref_logits) and torch.equal(f["layer2"], ref_f)
    assert torch.equal(memo_logits(teacher, ds.train), predict_logits(teacher, ds.train))
    # one memo: a second objective on the same teacher and split reuses the entries
    assert teacher_cache.teacher_outputs(teacher, ds.train, ["layer2"])[1]["layer2"] is f["layer2"]
    assert teacher_cache.teacher_outputs(teacher, ds.train, [])[0] is logits
    assert memo_logits(teacher, ds.train) is memo_logits(teacher, ds.train)
    clear_logit_memo()  # the old name empties the same memo
    assert teacher_cache.teacher_outputs(teacher, ds.train, [])[0] is not logits


def test_weights_changed_in_place_are_never_served_stale_outputs():
    teacher_cache.clear_teacher_cache()
    ds, teacher = _image()
    old_logits, old_f = teacher_cache.teacher_outputs(teacher, ds.train, ["layer1"])
    old_memo = memo_logits(teacher, ds.train)
    with torch.no_grad():  # e.g. an EMA update or a hand edit through .data: no version counter moves
        teacher.fc.weight.data.mul_(2.0)
        teacher.layer1[0].conv1.weight.data.add_(0.1)
    new_logits, new_f = teacher_cache.teacher_outputs(teacher, ds.train, ["layer1"])
    ref_logits, ref_f = _fresh_pass(teacher, ds.train, 256, "layer1")
    assert torch.equal(new_logits, ref_logits) and torch.equal(new_f["layer1"], ref_f)
    assert not torch.equal(new_logits, old_logits) and not torch.equal(new_f["layer1"], old_f["layer1"])
    assert torch.equal(memo_logits(teacher, ds.train), predict_logits(teacher, ds.train))
    assert not torch.equal(memo_logits(teacher, ds.train), old_memo)


def test_a_student_trained_then_used_as_teacher_gets_its_new_outputs():
    """Born-again: the same module object is a student (trained in place), then a teacher."""
    teacher_cache.clear_teacher_cache()
    ds, model = _image()
    before = memo_logits(model, ds.train)
    fit(model, ds.train, epochs=1, batch_size=16, progress=False)
    freeze(model)
    after = memo_logits(model, ds.train)
    assert torch.equal(after, predict_logits(model, ds.train)) and not torch.equal(after, before)
    # buffers count too: BN running statistics moved by a train-mode pass
    model.train()
    with torch.no_grad():
        model(next(ds.train.batches(16)).x * 3)
    model.eval()
    assert torch.equal(memo_logits(model, ds.train), predict_logits(model, ds.train))


def test_split_contents_module_identity_and_batch_size_are_part_of_the_key():
    teacher_cache.clear_teacher_cache()
    ds, teacher = _image()
    a = memo_logits(teacher, ds.train)
    ds.train.images.add_(0.5)  # the split's tensor changed in place
    b = memo_logits(teacher, ds.train)
    assert torch.equal(b, predict_logits(teacher, ds.train)) and not torch.equal(a, b)
    twin = ResNet(8, 4).eval()
    twin.load_state_dict(teacher.state_dict())
    twin.extra = 1  # same weights, another module (its attributes may shape its outputs): its own entry
    assert memo_logits(twin, ds.train) is not b
    assert memo_logits(teacher, ds.train, batch_size=7) is not b  # how a number is computed is in the key
    assert torch.equal(memo_logits(teacher, ds.train, batch_size=7), predict_logits(teacher, ds.train, 7))


def test_entries_of_freed_teachers_go_and_the_memo_stays_bounded(monkeypatch):
    teacher_cache.clear_teacher_cache()
    ds, teacher = _image()
    memo_logits(teacher, ds.train)
    n = len(teacher_cache._MEMO)
    del teacher
    other = ResNet(8, 4).eval()
    memo_logits(other, ds.train)
    assert len(teacher_cache._MEMO) == n  # the freed teacher's entry was dropped
    monkeypatch.setattr(teacher_cache, "MEMO_ENTRIES", 2)
    teacher_cache.teacher_outputs(other, ds.train, ["layer1", "layer2", "layer3"])  # one call keeps all it returns
    assert len(teacher_cache._MEMO) == 4
    memo_logits(other, ds.val)
    assert len(teacher_cache._MEMO) == 2


def test_callables_and_tensorless_splits_are_not_memoised():
    teacher_cache.clear_teacher_cache()
    ds, teacher = _image()
    fn = lambda x: teacher(x)  # noqa: E731
    assert torch.equal(memo_logits(fn, ds.train), predict_logits(teacher, ds.train))
    assert len(teacher_cache._MEMO) == 0


def test_teacher_targets_live_in_the_same_memo_and_equal_a_fresh_pass():
    teacher_cache.clear_teacher_cache()
    d = text.make_data(48, 16, 16, n_teacher_train=32, n_general=16, seed=2)
    torch.manual_seed(0)
    teacher = tk.freeze(tk.build(tk.BertSpec(layers=2, hidden=32, heads=2, intermediate=64), d))
    tt = TeacherTargets.compute(teacher, d.train, [0, 2], [1], dtype=torch.float32)
    # the oracle: a hand-written eval pass, padded back to the split's width
    full = d.train.input_ids.shape[1]
    ref_h, ref_a = [], []
    with torch.no_grad():
        for b in d.train.batches(256):
            out = teacher.forward_all(b.x)
            pad = full - b.x.shape[1]
            ref_h.append(F.pad(out.hidden_states[2], (0, 0, 0, pad)))
            ref_a.append(F.pad(out.attentions[0], (0, pad, 0, pad)))
    assert torch.equal(tt.hidden[2], torch.cat(ref_h)) and torch.equal(tt.attentions[1], torch.cat(ref_a))
    # its logits are the logits entry every objective reads at that batch size (teacher(x) == forward_all logits)
    assert torch.equal(tt.logits, predict_logits(teacher, d.train, 256))
    assert teacher_cache.teacher_outputs(teacher, d.train, [])[0] is tt.logits
    again = TeacherTargets.compute(teacher, d.train, [2], [1], dtype=torch.float32)
    assert again.hidden[2] is tt.hidden[2] and again.attentions[1] is tt.attentions[1]
    half = TeacherTargets.compute(teacher, d.train, [2], [], dtype=torch.float16)  # dtype is in the key
    assert half.hidden[2].dtype == torch.float16 and torch.equal(half.hidden[2], tt.hidden[2].half())
    with torch.no_grad():
        next(teacher.parameters()).data.add_(0.05)  # weights changed in place: recomputed
    fresh = TeacherTargets.compute(teacher, d.train, [2], [1], dtype=torch.float32)
    assert not torch.equal(fresh.hidden[2], tt.hidden[2])
    assert torch.equal(fresh.logits, predict_logits(teacher, d.train, 256))


def test_old_import_paths_are_the_one_memo():
    from kdcourse import feature_kd
    from kdcourse import train

    assert feature_kd.clear_teacher_cache is teacher_cache.clear_teacher_cache is train.clear_logit_memo
    assert feature_kd.teacher_outputs is teacher_cache.teacher_outputs and train.memo_logits is teacher_cache.memo_logits
    assert isinstance(teacher_cache.LOGIT_MEMO_SIZE, int)
