"""Model registry in the style of timm: ``@register_model`` builders, ``create_model(name)``.

Every model takes a 1-channel (grey) image of any size and returns class logits; every model
is trained from scratch (no downloadable weights exist here).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision import models as tvm

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, **kw) -> nn.Module:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(list_models())}")
    return _REGISTRY[name](num_classes=num_classes, **kw)


# Smallest input side each model takes; the others run from 8 px. VGG halves its map five times
# with unpadded 2 x 2 max-pools, which leave nothing of a map under 32 px.
MIN_INPUT = {"vgg16": 32}


def min_input_size(name: str) -> int:
    return MIN_INPUT.get(name, 8)


def saliency_layer(model: nn.Module) -> nn.Module:
    """The last convolutional block: where Grad-CAM looks (each builder sets ``cam_layer``)."""
    return model.get_submodule(model.cam_layer)


def feature_channels(model: nn.Module) -> int | None:
    """Channels of the saliency layer's output: the pooled features an OOD feature head reads."""
    for m in reversed(list(saliency_layer(model).modules())):
        if isinstance(m, nn.BatchNorm2d):
            return m.num_features
        if isinstance(m, nn.Conv2d):
            return m.out_channels
    return None


def has_class_maps(model: nn.Module) -> bool:
    """Whether the head is global pooling + one linear layer on ``cam_layer`` (builders say so with
    ``cam_head``): then each class's map is exact (in eval mode: EfficientNet's dropout sits
    between the pooling and the linear layer) and can be trained (`core.engine.class_maps`)."""
    return bool(getattr(model, "cam_head", None))


def _grey_stem(conv: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     bias=conv.bias is not None)


@register_model
def simple_cnn(num_classes: int) -> nn.Module:
    """The seed project's model: 2 x (conv, ReLU, max-pool), then 2 fully connected layers."""
    m = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        # not in place: Grad-CAM hooks the conv ("3") and keeps its output, which an in-place
        # ReLU overwrote on CPU only (grad-cam's .cpu() copies on a GPU): maps differed by device
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(8), nn.Flatten(),
        nn.Linear(64 * 8 * 8, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes))
    m.cam_layer = "3"
    return m


@register_model
def cnn_bn(num_classes: int, dropout: float = 0.5) -> nn.Module:
    """3 conv blocks with batch-norm, then 2 dense layers with dropout."""
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o),
                             nn.ReLU(inplace=True), nn.MaxPool2d(2))
    m = nn.Sequential(block(1, 32), block(32, 64), block(64, 128),
                      nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Dropout(dropout),
                      nn.Linear(128 * 16, 256), nn.ReLU(inplace=True), nn.Dropout(dropout),
                      nn.Linear(256, num_classes))
    m.cam_layer = "2"
    return m


def _grey_resnet(build, num_classes: int) -> nn.Module:
    m = build(weights=None, num_classes=num_classes)
    m.conv1 = _grey_stem(m.conv1)
    m.cam_layer, m.cam_head = "layer4", "fc"
    return m


@register_model
def resnet18(num_classes: int) -> nn.Module:
    return _grey_resnet(tvm.resnet18, num_classes)


@register_model
def resnet18_half(num_classes: int) -> nn.Module:
    """ResNet18's blocks at half its width (32-64-128-256 channels, 2.8 M parameters): a quarter
    of the compute, so about three times the epochs in the same CPU time (bench/train_throughput.py)."""
    block = tvm.resnet.BasicBlock
    m = tvm.ResNet(block, [2, 2, 2, 2], num_classes=num_classes)
    widths = (32, 64, 128, 256)
    # torchvision's ResNet fixes 64-512 channels; _make_layer builds each stage from `inplanes`.
    m.inplanes = widths[0]
    m.conv1 = nn.Conv2d(1, widths[0], 7, 2, 3, bias=False)
    m.bn1 = nn.BatchNorm2d(widths[0])
    m.layer1 = m._make_layer(block, widths[0], 2)
    m.layer2 = m._make_layer(block, widths[1], 2, stride=2)
    m.layer3 = m._make_layer(block, widths[2], 2, stride=2)
    m.layer4 = m._make_layer(block, widths[3], 2, stride=2)
    m.fc = nn.Linear(widths[3], num_classes)
    for conv in (c for c in m.modules() if isinstance(c, nn.Conv2d)):  # as ResNet's own init
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    m.cam_layer, m.cam_head = "layer4", "fc"
    return m


@register_model
def resnet50(num_classes: int) -> nn.Module:
    return _grey_resnet(tvm.resnet50, num_classes)


@register_model
def efficientnet_b0(num_classes: int) -> nn.Module:
    m = tvm.efficientnet_b0(weights=None, num_classes=num_classes)
    m.features[0][0] = _grey_stem(m.features[0][0])
    m.cam_layer, m.cam_head = "features", "classifier.1"
    return m


@register_model
def vgg16(num_classes: int) -> nn.Module:
    """VGG16 with batch-norm; the 4096-wide head (500 MB) is replaced by a pooled 512 -> 256 head."""
    m = tvm.vgg16_bn(weights=None)
    m.features[0] = _grey_stem(m.features[0])
    m.avgpool = nn.AdaptiveAvgPool2d(1)
    m.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(512, 256),
                                 nn.ReLU(inplace=True), nn.Dropout(0.3), nn.Linear(256, num_classes))
    m.cam_layer = "features"
    return m


def _grey_mobilenet(build, num_classes: int) -> nn.Module:
    m = build(weights=None, num_classes=num_classes)
    m.features[0][0] = _grey_stem(m.features[0][0])
    m.cam_layer = "features"
    return m


@register_model
def mobilenet_v3_small(num_classes: int) -> nn.Module:
    return _grey_mobilenet(tvm.mobilenet_v3_small, num_classes)


@register_model
def mobilenet_v3_large(num_classes: int) -> nn.Module:
    return _grey_mobilenet(tvm.mobilenet_v3_large, num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def cam_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``cam_layer`` output (N, K, h, w) and the logits, from one forward pass."""
    store = {}
    h = saliency_layer(model).register_forward_hook(lambda m, i, o: store.__setitem__("f", o))
    try:
        logits = model(x)
    finally:
        h.remove()
    return store["f"], logits


def pooled_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled features before the classifier, logits) in one pass: what the feature-density
    out-of-distribution scores and the gate's feature head read."""
    f, logits = cam_features(model, x)
    return f.mean(dim=(2, 3)), logits
