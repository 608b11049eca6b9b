"""The classifier factory and the default attribution layers."""

from __future__ import annotations

import pytest
import torch

from monai_ext.attribution import resolve_layer
from monai_ext.networks import CLASSIFIERS, build_classifier, default_cam_layer, default_iba_layer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CPU is shared: one intra-op thread avoids OpenMP spinning against other processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name,cam,iba", [("densenet121", "features.denseblock4", "features.transition2"),
                                          ("resnet18", "layer4", "layer2"), ("resnet34", "layer4", "layer2"),
                                          ("seresnext50", "layer4", "layer2")])
def test_build_and_default_layers(name, cam, iba):
    net = build_classifier(name, in_channels=1, num_classes=2)
    assert default_cam_layer(net) == cam and default_iba_layer(net) == iba
    resolve_layer(net, cam)
    resolve_layer(net, iba)


def test_forward_shapes_and_options():
    net = build_classifier("DenseNet-121", in_channels=3, num_classes=4).eval()
    with torch.no_grad():
        assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    assert set(CLASSIFIERS) >= {"densenet121", "resnet18", "resnet34", "seresnext50"}


def test_errors_and_fallback_layers():
    with pytest.raises(ValueError, match="unknown classifier"):
        build_classifier("vgg16")
    with pytest.raises(ValueError, match="in_channels"):
        build_classifier("resnet18", in_channels=0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Conv2d(2, 2, 3), torch.nn.Conv2d(2, 2, 3))
    assert default_cam_layer(plain) == "2" and default_iba_layer(plain) == "1"
    with pytest.raises(ValueError, match="no Conv2d"):
        default_cam_layer(torch.nn.Linear(2, 2))


def test_default_layers_of_a_two_block_densenet_give_24_by_24_maps():
    """The ct-severity network: two dense blocks, so the last block and the IBA layer are 1/8 of the input."""
    from monai.networks.nets import DenseNet

    net = DenseNet(2, 1, 2, init_features=32, growth_rate=16, block_config=(6, 12)).eval()
    assert default_cam_layer(net) == "features.denseblock2"
    assert default_iba_layer(net) == "features.transition1"
    with torch.no_grad():
        assert net.features(torch.zeros(1, 1, 192, 192)).shape[-2:] == (24, 24)
