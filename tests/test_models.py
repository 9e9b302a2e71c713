"""Model builders: offline builds, the packaged EfficientNet-Lite0 weights, the fine-tuning setting."""

import copy
import re

import pytest
import torch
import torchvision.transforms.functional as TF
from torch import nn

from odl_fed.asi import ASIConv2d, inject_asi
from odl_fed.training.models import MODELS, build_model, head_name, prepare_finetune, save_checkpoint

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.mark.parametrize("name", MODELS)
def test_every_model_builds_offline_and_fine_tunes_its_last_convs(name):
    model = build_model(name, num_classes=7)
    assert model.get_submodule(head_name(model)).out_features == 7
    convs = prepare_finetune(model, layers=2)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(any(n.startswith(c + ".") or n.startswith(head_name(model) + ".") for c in convs)
                           for n in trained)
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    inject_asi(model, {c: (2, 4, 2, 2) for c in convs})
    model.eval()
    torch.testing.assert_close(model(x), expected)  # forward is exact whatever the ranks
    model(x).sum().backward()
    assert all(model.get_submodule(c).weight.grad is not None for c in convs)


def _photo(name):
    import skimage.data

    image = TF.to_tensor(getattr(skimage.data, name)())
    image = TF.center_crop(TF.resize(image, 224, antialias=True), 224)
    return TF.normalize(image, IMAGENET_MEAN, IMAGENET_STD).unsqueeze(0)


def test_efficientnet_lite0_packaged_weights_recognise_real_photos():
    """The packaged ImageNet weights, upstream 'not thoroughly tested': a cat and an espresso."""
    model = build_model("efficientnet_lite0", weights="imagenet", num_classes=1000)
    with torch.no_grad():
        cat = model(_photo("chelsea")).softmax(-1)
        coffee = model(_photo("coffee")).softmax(-1)
    assert cat.argmax().item() in IMAGENET_CATS and cat[0, IMAGENET_CATS].sum() > 0.5
    assert coffee.argmax().item() == 967  # espresso


def test_efficientnet_lite0_static_padding_convs_are_compressed_exactly():
    model = build_model("efficientnet_lite0", weights="imagenet", num_classes=10)
    convs = prepare_finetune(model, layers=4)
    assert convs == ["_blocks.15._expand_conv", "_blocks.15._depthwise_conv", "_blocks.15._project_conv",
                     "_conv_head"]
    reference = copy.deepcopy(model)
    inject_asi(model, {c: (None,) * 4 for c in convs})
    assert isinstance(model.get_submodule("_blocks.15._depthwise_conv"), ASIConv2d)
    x = torch.randn(2, 3, 96, 96)
    y = torch.tensor([1, 2])
    nn.functional.cross_entropy(model(x), y).backward()
    nn.functional.cross_entropy(reference(x), y).backward()
    for c in convs:
        torch.testing.assert_close(model.get_submodule(c).weight.grad, reference.get_submodule(c).weight.grad,
                                   rtol=1e-4, atol=1e-6)


def test_checkpoints_round_trip_and_refuse_another_model(tmp_path):
    model = build_model("resnet18", num_classes=10)
    path = save_checkpoint(model, "resnet18", tmp_path / "r18.pt")
    again = build_model("resnet18", weights=path, num_classes=10)
    torch.testing.assert_close(again.fc.weight, model.fc.weight)
    other_head = build_model("resnet18", weights=path, num_classes=3)  # fine-tune to a new task
    torch.testing.assert_close(other_head.layer4[1].conv2.weight, model.layer4[1].conv2.weight)
    assert other_head.fc.out_features == 3
    with pytest.raises(ValueError, match=re.escape(f"weights file {path} holds a 'resnet18' model, not 'resnet34'")):
        build_model("resnet34", weights=path)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(name="vgg11"), ValueError, "model must be one of ['mobilenet_v2', 'mobilenet_v3_small', 'resnet18', "
                                         "'resnet34', 'efficientnet_lite0'], but got model='vgg11'"),
        (dict(name="resnet18", weights="/nowhere/r18.pth"), FileNotFoundError,
         "weights file /nowhere/r18.pth does not exist"),
        (dict(name="resnet18", num_classes=0), ValueError,
         "num_classes must be a positive integer, but got num_classes=0"),
    ],
)
def test_bad_model_arguments_are_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        build_model(**kwargs)


def test_layers_beyond_the_models_depth_are_refused():
    model = build_model("mobilenet_v3_small")
    with pytest.raises(ValueError, match=r"count must be an integer from 1 to \d+ \(the model's Conv2d layers\), "
                                         r"but got count=500"):
        prepare_finetune(model, layers=500)
