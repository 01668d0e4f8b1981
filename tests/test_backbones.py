"""Backbones: every registered name builds, weights come from the caches or local files, errors are one line.

Downloads (served on 127.0.0.1) and the cxrmem-weights command are tested in test_weights.py."""

import pytest
import torch
import torchvision

from cxrmem.utils.errors import UserError
from cxrmem.models.backbones import BACKBONES, build_backbone, pretrained_file
from cxrmem.models.net import CXRNet

from helpers import refuse_network, set_hub_offline

TIMM_NAME = "timm/resnet10t"


@pytest.fixture
def empty_caches(empty_caches, monkeypatch):
    """conftest's empty caches, on a machine without internet."""
    refuse_network(monkeypatch)
    set_hub_offline(monkeypatch)
    return empty_caches


# what the last block of a body must show, where it is easy to see
FINAL_BLOCK_CHANNELS = {"efficientnet_v2_s": 1280, "efficientnet_v2_m": 1280, "efficientnet_v2_l": 1280,
                        "resnet50": 2048, "densenet121": 1024}


@pytest.mark.parametrize("name", [*BACKBONES, TIMM_NAME])
def test_every_backbone_builds_and_classifies_at_64px(name):
    torch.manual_seed(0)
    backbone = build_backbone(name, pretrained=False)
    batch = 1 if name == "efficientnet_v2_l" else 2
    images = torch.randn(batch, 3, 64, 64)
    net = CXRNet(backbone, num_classes=14).eval()
    with torch.no_grad():
        feature_map = backbone.body(images)
        pooled = backbone.pool(feature_map)
        logits = net(images)
    assert pooled.shape == (batch, backbone.num_features)
    assert logits.shape == (batch, 14)
    assert torch.isfinite(logits).all()
    if name in FINAL_BLOCK_CHANNELS:  # efficientnet's 1x1 head conv, resnet's layer4, densenet's norm5
        assert feature_map.shape[1] == backbone.num_features == FINAL_BLOCK_CHANNELS[name]
    if name == "densenet121":
        assert feature_map.min() >= 0  # the ReLU torchvision applies after norm5 is part of the body


@pytest.mark.parametrize("name", ["efficientnet_v2_s", "resnet18", TIMM_NAME])
def test_pretrained_without_cached_weights_is_a_one_line_user_error(name, empty_caches):
    with pytest.raises(UserError) as error:
        build_backbone(name, pretrained=True)
    message = str(error.value)
    assert "\n" not in message
    assert f"pretrained weights for {name} are not in the" in message
    assert str(empty_caches) in message
    assert "model.pretrained: false" in message and "model.weights" in message
    file = pretrained_file(name)
    assert f"put {file.filename} from {file.url} into {file.folder}" in message


def test_pretrained_torchvision_weights_come_from_the_torch_cache(empty_caches):
    source = torchvision.models.resnet18()
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    checkpoints = empty_caches / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(source.state_dict(), checkpoints / url.rsplit("/", 1)[1])
    backbone = build_backbone("resnet18", pretrained=True)
    torch.testing.assert_close(backbone.body.conv1.weight, source.conv1.weight)
    torch.testing.assert_close(backbone.body.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)


def test_pretrained_timm_weights_come_from_the_hugging_face_cache(empty_caches):
    import timm

    source = timm.create_model("resnet10t")
    repo = empty_caches / "hf" / "hub" / "models--timm--resnet10t.c3_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    torch.save(source.state_dict(), snapshot / "pytorch_model.bin")
    backbone = build_backbone(TIMM_NAME, pretrained=True)
    torch.testing.assert_close(backbone.body.model.conv1[0].weight, source.conv1[0].weight)


def test_local_weights_of_the_full_model_or_the_body(tmp_path):
    full = torchvision.models.resnet18()
    torch.save(full.state_dict(), tmp_path / "full.pth")
    from_full = build_backbone("resnet18", weights=tmp_path / "full.pth")
    torch.testing.assert_close(from_full.body.layer1[0].conv1.weight, full.layer1[0].conv1.weight)

    torch.save(from_full.body.state_dict(), tmp_path / "body.pth")
    from_body = build_backbone("resnet18", weights=str(tmp_path / "body.pth"))
    torch.testing.assert_close(from_body.body.layer1[0].conv1.weight, full.layer1[0].conv1.weight)


def test_local_timm_body_weights(tmp_path):
    first = build_backbone(TIMM_NAME)
    torch.save(first.body.state_dict(), tmp_path / "body.pth")
    second = build_backbone(TIMM_NAME, weights=tmp_path / "body.pth")
    for (key, a), b in zip(first.body.state_dict().items(), second.body.state_dict().values()):
        assert torch.equal(a, b), key


def test_local_weights_errors_are_one_line_user_errors(tmp_path):
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "resnet34.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    cases = {
        tmp_path / "resnet34.pth": "does not match backbone resnet18",
        tmp_path / "missing.pth": "does not exist",
        tmp_path / "junk.pth": "not a readable weights file",
    }
    for path, expected in cases.items():
        with pytest.raises(UserError, match=expected) as error:
            build_backbone("resnet18", weights=path)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "name, closest",
    [("resnet500", "resnet50"), ("densenet12", "densenet121"), ("efficientnet_v2_ss", "efficientnet_v2_s"),
     ("timm/resnet10tt", "timm/resnet10t")],
)
def test_unknown_name_names_the_closest_valid_one(name, closest):
    with pytest.raises(UserError) as error:
        build_backbone(name)
    message = str(error.value)
    assert f"did you mean {closest}?" in message and "\n" not in message
    if not name.startswith("timm/"):
        assert all(valid in message for valid in BACKBONES)
