"""Model registry: every registered model builds and runs; timm models; normalisation inside."""

from __future__ import annotations

import pytest
import torch

from dat.models import Normalize, create, has_dual_bn, list_models
from dat.models.normalize import CIFAR10_MEAN, CIFAR10_STD

# Parameter counts the constructors' docstrings promise (10 classes), in millions.
DOCUMENTED_MILLIONS = {"resnet18": 11.2, "wrn28_10": 36.5, "wrn34_10": 46.2}


def test_registry_lists_the_documented_models() -> None:
    names = list_models()
    assert names == sorted(names)
    for name in ("resnet18", "preact_resnet18", "resnet_tiny", "resnet_small", "wrn28_10",
                 "wrn34_10"):
        assert name in names


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_builds_and_runs(name: str) -> None:
    model = create(name, num_classes=10, dual_bn=False).eval()
    assert not has_dual_bn(model)
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 32, 32))  # batch of 2: WRN-34-10 runs on CPU too
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    if name in DOCUMENTED_MILLIONS:
        assert round(millions, 1) == DOCUMENTED_MILLIONS[name]


@pytest.mark.parametrize("name", list_models())
def test_normalisation_buffers_are_not_in_the_state_dict(name: str) -> None:
    model = create(name, num_classes=3)
    buffers = dict(model.named_buffers())
    assert "normalize.mean" in buffers and "normalize.std" in buffers
    assert not any(key.startswith("normalize.") for key in model.state_dict())
    fresh = create(name, num_classes=3)
    fresh.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("name", ["resnet_tiny", "preact_resnet18"])
def test_dual_bn_models_run_in_every_branch(name: str) -> None:
    model = create(name, num_classes=5, dual_bn=True)
    assert has_dual_bn(model)
    x = torch.rand(4, 3, 32, 32)
    assert model(x).shape == (4, 5)


def test_normalize_is_per_channel_mean_std() -> None:
    x = torch.rand(2, 3, 4, 4)
    out = Normalize(CIFAR10_MEAN, CIFAR10_STD)(x)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.allclose(out, (x - mean) / std)


def test_model_input_is_in_0_1_and_normalised_inside() -> None:
    torch.manual_seed(0)
    model = create("resnet_tiny").eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.linear(
            torch.nn.functional.adaptive_avg_pool2d(
                model.layer4(model.layer3(model.layer2(model.layer1(
                    torch.relu(model.bn1(model.conv1(model.normalize(x)))))))), 1
            ).flatten(1)
        )
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("name", ["timm/resnet10t", "timm/resnet18"])
def test_timm_models_through_the_registry(name: str) -> None:
    model = create(name, num_classes=7, dual_bn=True)
    assert has_dual_bn(model)
    assert not any(key.startswith("normalize.") for key in model.state_dict())
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_pretrained_timm_weights_are_refused_with_the_way_to_wrap_them() -> None:
    """``pretrained=True`` used to collide with our own pretrained=False in a TypeError."""
    import timm

    from dat.models import TimmClassifier

    with pytest.raises(ValueError, match=r"never downloads.*dat.models.TimmClassifier\(net"):
        create("timm/resnet10t", num_classes=7, pretrained=True)
    net = timm.create_model("resnet10t", pretrained=False, num_classes=7)  # as the fix says
    model = TimmClassifier(net, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_none_keyword_arguments_are_ignored() -> None:
    torch.manual_seed(0)
    a = create("resnet_tiny", width=None)
    torch.manual_seed(0)
    b = create("resnet_tiny")
    assert a.conv1.weight.shape == b.conv1.weight.shape == (8, 3, 3, 3)
    assert create("resnet_tiny", width=4).conv1.weight.shape == (4, 3, 3, 3)


@pytest.mark.parametrize(
    "name, match",
    [("resnet19", "unknown model 'resnet19'"),
     ("timm/not_a_model_xyz", "timm has no model 'not_a_model_xyz'")],
)
def test_unknown_names_give_clear_errors(name: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        create(name)
    assert "\n" not in str(info.value)


NETS = '''
import torch
from torch import nn

import dat


class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.normalize = dat.models.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

    def forward(self, x):
        return self.body(self.normalize(x))


def build(num_classes=10):
    return Net(num_classes)


def fixed():
    return Net(7)


def not_a_model(num_classes):
    return "oops"
'''


def test_your_own_builder_by_module_or_file(tmp_path, monkeypatch) -> None:
    (tmp_path / "nets.py").write_text(NETS)
    model = create(f"{tmp_path / 'nets.py'}:build", num_classes=5, dual_bn=True)
    assert has_dual_bn(model) and model.eval()(torch.rand(2, 3, 16, 16)).shape == (2, 5)
    assert create(f"{tmp_path / 'nets.py'}:fixed").body[-1].out_features == 7  # no num_classes
    monkeypatch.syspath_prepend(str(tmp_path))
    assert create("nets:build", num_classes=3).body[-1].out_features == 3
    with pytest.raises(ValueError, match="returned str, not a torch nn.Module"):
        create("nets:not_a_model")
    with pytest.raises(ValueError, match="nets has no function 'missing'"):
        create("nets:missing")
    with pytest.raises(ValueError, match="no_such.py does not exist"):
        create(f"{tmp_path / 'no_such.py'}:build")


def test_a_builder_file_may_use_dataclasses_and_import_its_neighbours_late(tmp_path) -> None:
    """Both failed: the file was not in sys.modules (dataclasses looks it up), and its
    folder left sys.path before the builder ran."""
    from dat.entry_points import absolute_spec

    (tmp_path / "blocks.py").write_text("from torch import nn\nWIDTH = 4\n")
    (tmp_path / "late.py").write_text(
        "from __future__ import annotations\n"
        "from dataclasses import dataclass\n"
        "from torch import nn\n\n\n"
        "@dataclass\n"
        "class Size:\n"
        "    classes: int\n\n\n"
        "def build(num_classes):\n"
        "    import blocks\n\n"
        "    size = Size(num_classes)\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(blocks.WIDTH, size.classes))\n")
    model = create(f"{tmp_path / 'late.py'}:build", num_classes=3)
    assert model(torch.rand(2, 1, 2, 2)).shape == (2, 3)
    assert absolute_spec(f"{tmp_path}/sub/../late.py:build") == f"{tmp_path / 'late.py'}:build"


def test_a_package_that_fails_inside_is_not_blamed_on_pythonpath(tmp_path, monkeypatch):
    (tmp_path / "badpkg").mkdir()
    (tmp_path / "badpkg" / "__init__.py").write_text("import missing_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="importing 'badpkg' failed: No module named "
                                         "'missing_dependency_xyz' \\(a module it imports"):
        create("badpkg:build")
    with pytest.raises(ValueError, match="cannot import 'no_pkg_xyz'.*add its folder to "
                                         "PYTHONPATH"):
        create("no_pkg_xyz:build")


def test_an_unknown_name_lists_every_way_to_name_a_model() -> None:
    with pytest.raises(ValueError) as info:
        create("resnet19")
    message = str(info.value)
    assert str(list_models()) in message  # the names to pick from, not only "unknown"
    assert "'timm/<timm model name>'" in message and "module:function" in message


def test_a_name_cannot_be_registered_twice() -> None:
    from dat.models import register

    with pytest.raises(ValueError, match="model 'resnet_tiny' is already registered"):
        register("resnet_tiny")(lambda num_classes: None)
    assert create("resnet_tiny").linear.out_features == 10  # the original is kept


def test_normalize_checks_std_too_and_keeps_the_input_dtype() -> None:
    with pytest.raises(ValueError, match="in_chans=1 but mean/std have 1/3 values"):
        Normalize((0.5,), CIFAR10_STD, channels=1)
    x = torch.rand(2, 3, 4, 4).bfloat16()  # float32 buffers would promote bf16 inputs
    assert Normalize(CIFAR10_MEAN, CIFAR10_STD)(x).dtype == torch.bfloat16


def test_timm_models_normalise_once_with_the_given_mean_and_std() -> None:
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    model = create("timm/resnet10t", num_classes=7, mean=mean, std=std, drop_rate=0.25,
                   pretrained=False).eval()  # pretrained=False is allowed: it is what we do
    assert model.net.drop_rate == 0.25  # other keyword arguments reach timm.create_model
    assert torch.equal(model.normalize.mean.flatten(), torch.tensor(mean))
    assert torch.equal(model.normalize.std.flatten(), torch.tensor(std))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model.net(Normalize(mean, std)(x)))
