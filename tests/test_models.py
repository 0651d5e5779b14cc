"""Every registered model: grey input of any size, logits out, one sane training step, a CAM layer."""
import pytest
import torch
from torch import nn

from core.engine import set_nll
from core.models import (cam_features, count_parameters, create_model, feature_channels,
                         has_class_maps, list_models, pooled_features, register_model, saliency_layer)

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Batches of two images gain nothing from a second thread, and on a busy 2-core machine
    two OpenMP threads wait on each other for seconds per call."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


EXPECTED = {"simple_cnn", "cnn_bn", "resnet18", "resnet18_half", "resnet50", "efficientnet_b0", "vgg16",
            "mobilenet_v3_small", "mobilenet_v3_large"}


def test_registry_lists_the_documented_models():
    assert EXPECTED <= set(list_models())
    assert list_models() == sorted(list_models())


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet1000", 4)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_forward_train_step_and_saliency_layer(name):
    torch.manual_seed(0)
    model = create_model(name, 4)
    x = torch.randn(2, 1, 64, 64)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 4) and torch.isfinite(out).all()

    # The Grad-CAM layer exists, is part of the model and gives a feature map.
    layer = saliency_layer(model)
    assert isinstance(layer, nn.Module)
    assert any(m is layer for m in model.modules())
    seen = {}
    def hook(module, inputs, output):
        seen["shape"] = tuple(output.shape)
    h = layer.register_forward_hook(hook)
    with torch.no_grad():
        model(x)
    h.remove()
    assert len(seen["shape"]) == 4 and seen["shape"][0] == 2
    feats, logits = pooled_features(model, x)
    assert feats.shape == (2, seen["shape"][1]) and logits.shape == (2, 4)

    # One training step with a fine and a coarse ('tumor') label: finite, and it moves weights.
    model.train()
    allowed = torch.tensor([[True, False, False, False], [True, True, True, False]])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # no weight decay: only gradients move weights
    before = [p.detach().clone() for p in model.parameters()]
    loss = set_nll(model(x), allowed, smoothing=0.1)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    opt.zero_grad()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    opt.step()
    changed = sum(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))
    assert changed >= 0.9 * len(before), f"only {changed}/{len(before)} tensors changed"
    assert count_parameters(model) > 0


def test_resnet18_half_is_resnet18_at_half_width():
    """Same depth and head (so the mask loss and exact class maps apply), half the channels:
    about a quarter of the weights; the gate's feature head reads its 256 channels."""
    full, half = create_model("resnet18", 4), create_model("resnet18_half", 4)
    convs = lambda m: [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert len(convs(half)) == len(convs(full))
    assert [c.out_channels * 2 for c in convs(half)] == [c.out_channels for c in convs(full)]
    assert has_class_maps(half) and feature_channels(half) == 256
    x = torch.randn(1, 1, 96, 96)  # same strides: the same 3 x 3 map for Grad-CAM
    assert cam_features(half.eval(), x)[0].shape[-2:] == cam_features(full.eval(), x)[0].shape[-2:]
    assert 0.2 < count_parameters(half) / count_parameters(full) < 0.3
    # ResNet's own init (kaiming normal, fan out), not the default uniform one of a bare Conv2d
    w = half.layer1[0].conv1.weight
    assert abs(w.std().item() - (2 / (w.shape[0] * 9)) ** 0.5) < 0.02


@pytest.mark.parametrize("name", ["simple_cnn", "mobilenet_v3_small"])
def test_any_input_size(name):
    model = create_model(name, 2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 96, 80)).shape == (1, 2)


def test_register_model_adds_a_builder():
    @register_model
    def _test_tiny(num_classes):
        m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, num_classes))
        m.cam_layer = "0"
        return m
    try:
        assert "_test_tiny" in list_models()
        assert create_model("_test_tiny", 3)(torch.randn(1, 1, 16, 16)).shape == (1, 3)
    finally:
        from core import models
        models._REGISTRY.pop("_test_tiny", None)
