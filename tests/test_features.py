"""Hook-based feature extraction: same tensors as the models' own
return_features, no hook left behind, the in-place trap detected."""
import pytest
import torch
import torch.nn as nn

from kdcourse import features as fx
from kdcourse.models import MobileCNN, ResNet, SmallCNN


@pytest.mark.parametrize("model", [ResNet(8, 4), SmallCNN((4, 8, 16)), MobileCNN((4, 8, 16), blocks=1)],
                         ids=["resnet", "cnn", "mobile"])
def test_hooks_give_the_models_own_features(model):
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    logits, feats = fx.extract(model, x, ["layer1", "layer2", "layer3", "fc:input"])
    ref_logits, ref = model(x, return_features=True)
    assert torch.equal(logits, ref_logits)
    for name in ("layer1", "layer2", "layer3"):
        assert torch.equal(feats[name], ref[name])
    assert torch.allclose(feats["fc:input"], ref["pool"])
    assert fx.hook_count(model) == 0


def test_context_manager_removes_hooks_even_after_an_error():
    model = SmallCNN((4, 8, 16))
    with pytest.raises(RuntimeError, match="boom"):
        with fx.FeatureExtractor(model, ["layer2"]) as ex:
            assert fx.hook_count(model) == 1
            model(torch.randn(1, 3, 32, 32))
            raise RuntimeError("boom")
    assert fx.hook_count(model) == 0
    assert ex.features["layer2"].shape == (1, 8, 8, 8)


def test_features_keep_the_graph_unless_detached():
    model = SmallCNN((4, 8, 16)).train()
    x = torch.randn(2, 3, 32, 32)
    _, feats = fx.extract(model, x, ["layer2"])
    feats["layer2"].pow(2).mean().backward()
    convs = lambda layer: [m for m in layer.modules() if isinstance(m, nn.Conv2d)]  # noqa: E731
    assert convs(model.layer2)[0].weight.grad is not None and convs(model.layer3)[0].weight.grad is None
    _, feats = fx.extract(model, x, ["layer2"], detach=True)
    assert not feats["layer2"].requires_grad


def test_unknown_names_are_reported_with_suggestions():
    with pytest.raises(ValueError, match="did you mean"):
        fx.FeatureExtractor(ResNet(8, 4), ["layer_2"])
    with pytest.raises(ValueError, match="module_names"):
        fx.FeatureExtractor(ResNet(8, 4), ["nothing_like_it"])
    with pytest.raises(ValueError, match="duplicates"):
        fx.FeatureExtractor(ResNet(8, 4), ["layer1", "layer1"])
    with pytest.raises(ValueError, match="empty"):
        fx.FeatureExtractor(ResNet(8, 4), [])
    with pytest.raises(ValueError, match="nn.Module"):
        fx.FeatureExtractor(lambda x: x, ["a"])


def test_in_place_overwrite_is_detected_and_clone_avoids_it():
    model = SmallCNN((4, 8, 16)).eval()  # conv, batch norm, ReLU(inplace=True)
    bn = next(n for n, m in model.named_modules() if n.startswith("layer1") and isinstance(m, nn.BatchNorm2d))
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(RuntimeError, match="in place"):
        fx.extract(model, x, [bn])
    _, feats = fx.extract(model, x, [bn], clone=True)
    assert (feats[bn] < 0).any()  # the batch-norm output before the ReLU


def test_no_forward_pass_is_reported():
    ex = fx.FeatureExtractor(SmallCNN((4, 8, 16)), ["layer1"])
    with ex:
        pass
    with pytest.raises(RuntimeError, match="no forward pass"):
        ex.collect()


def test_attach_twice_is_refused_and_remove_is_idempotent():
    model = SmallCNN((4, 8, 16))
    ex = fx.FeatureExtractor(model, "layer1").attach()
    with pytest.raises(RuntimeError, match="already attached"):
        ex.attach()
    ex.remove()
    ex.remove()
    assert fx.hook_count(model) == 0


def test_tuple_outputs_take_the_first_tensor():
    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, "extra"

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Pair()

        def forward(self, x):
            return self.block(x)[0]

    _, feats = fx.extract(Net(), torch.ones(1, 2), "block")
    assert torch.equal(feats["block"], torch.full((1, 2), 2.0))


def test_module_names_lists_hookable_modules():
    names = fx.module_names(SmallCNN((4, 8, 16)))
    assert {"stem", "layer1", "layer2", "layer3", "fc"} <= set(names) and "" not in names
    assert all("." in n or n in ("fc",) for n in fx.module_names(SmallCNN((4, 8, 16)), leaf_only=True))
