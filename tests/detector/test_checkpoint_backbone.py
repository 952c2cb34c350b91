import importlib.util
import json
import sys

import pytest
import torch

from core.errors import UserError
from detector import ModelConfig, build_detector, load_checkpoint, save_checkpoint
from detector.checkpoint import load_backbone_weights, load_model, read_checkpoint
from tests.conftest import FIXTURES, TINY_MODEL


def test_backbone_weights_from_a_torchvision_state_dict(tmp_path):
    torch.manual_seed(0)
    source = build_detector(ModelConfig(num_classes=3, **TINY_MODEL))
    # torchvision's file: backbone names at the top level plus a classifier we must ignore.
    tv = {**source.backbone.state_dict(), "fc.weight": torch.zeros(1000, 64), "fc.bias": torch.zeros(1000)}
    torch.save(tv, tmp_path / "resnet18.pth")
    torch.manual_seed(1)
    target = build_detector(ModelConfig(num_classes=3, **TINY_MODEL))
    load_backbone_weights(target, tmp_path / "resnet18.pth")
    assert all(
        torch.equal(a, b) for a, b in zip(source.backbone.state_dict().values(), target.backbone.state_dict().values())
    )
    assert not torch.equal(source.bbox_head.gfl_cls.weight, target.bbox_head.gfl_cls.weight)  # only the backbone


def test_backbone_weights_from_a_detector_checkpoint_and_a_wrong_depth(tmp_path):
    cfg = ModelConfig(num_classes=3, **TINY_MODEL)
    save_checkpoint(tmp_path / "det.pt", build_detector(cfg), cfg)
    load_backbone_weights(build_detector(cfg), tmp_path / "det.pt")  # backbone.* entries are used
    with pytest.raises(UserError, match="backbone weights .* does not fit"):
        load_backbone_weights(
            build_detector(ModelConfig(num_classes=3, **{**TINY_MODEL, "depth": 34})), tmp_path / "det.pt"
        )


def test_a_checkpoint_that_does_not_fit_names_the_backbone(tmp_path):
    cfg = ModelConfig(num_classes=3, **TINY_MODEL)
    save_checkpoint(tmp_path / "det.pt", build_detector(cfg), cfg)
    mobile = build_detector(ModelConfig(num_classes=3, backbone="mobilenet_v2", fpn_channels=16, head_channels=16,
                                        stacked_convs=1, gn_groups=4))
    with pytest.raises(UserError) as err:
        load_checkpoint(mobile, tmp_path / "det.pt")
    assert "does not fit the model (mobilenet_v2, 3 classes)" in str(err.value)  # not ResNet's depth and width
    with pytest.raises(UserError, match=r"does not fit the model \(R-34 x0.125 width, 3 classes\)"):
        load_checkpoint(build_detector(ModelConfig(num_classes=3, **{**TINY_MODEL, "depth": 34})), tmp_path / "det.pt")


LIGHT = ("mobilenet_v2", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
         "efficientnet_lite0")
HEAD = dict(num_classes=3, fpn_channels=16, head_channels=16, stacked_convs=1, gn_groups=4)


@pytest.mark.parametrize("name", LIGHT)
def test_a_bare_state_dict_of_a_light_weight_gfl_rebuilds_its_backbone(tmp_path, name):
    # A bare state dict (or mmdetection's) records no architecture: it is read off the key names,
    # and each shufflenet width off the channels of stage2 (all four share their names).
    config = ModelConfig(backbone=name, **HEAD)
    torch.save(build_detector(config).state_dict(), tmp_path / "bare.pth")
    assert load_model(tmp_path / "bare.pth", {"gn_groups": 4})[1] == config  # GroupNorm groups: not in the weights


def test_a_bare_state_dict_of_an_unknown_backbone_is_one_line(tmp_path):
    state = build_detector(ModelConfig(backbone="mobilenet_v2", **HEAD)).state_dict()
    state = {k.replace("backbone.features.", "backbone.trunk."): v for k, v in state.items()}  # no library's names
    torch.save(state, tmp_path / "bare.pth")
    with pytest.raises(UserError) as err:
        load_model(tmp_path / "bare.pth")
    message = str(err.value)
    assert "\n" not in message and "records no architecture" in message and "backbone.trunk.0.0.weight" in message
    # A --backbone flag that contradicts the weights is caught by the strict load, in one line too.
    torch.save(build_detector(ModelConfig(backbone="shufflenet_v2_x0_5", **HEAD)).state_dict(), tmp_path / "s.pth")
    with pytest.raises(UserError, match=r"does not fit the model \(shufflenet_v2_x1_0, 3 classes\)"):
        load_model(tmp_path / "s.pth", {"backbone": "shufflenet_v2_x1_0", "gn_groups": 4})


needs_safetensors = pytest.mark.skipif(importlib.util.find_spec("safetensors") is None,
                                       reason="the backbones extra is not installed: pip install 'ldcache[backbones]'")


def timm_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every entry of timm's efficientnet_lite0 state dict (classifier included), by its key list."""
    keys = json.loads((FIXTURES / "backbone_keys" / "efficientnet_lite0.json").read_text())["state_dict"]
    return {k: torch.tensor(7) if k.endswith("num_batches_tracked") else torch.rand(shape, generator=generator) + 0.5
            for k, shape in keys.items()}


@needs_safetensors
@pytest.mark.parametrize("file_name", ["model.safetensors", "renamed.bin"])  # known by its name or by its start
def test_a_timm_safetensors_file_loads_into_efficientnet_lite0(tmp_path, file_name):
    from safetensors.torch import save_file

    state = timm_tensors(torch.Generator().manual_seed(0))
    save_file(state, tmp_path / file_name)  # as the Hugging Face hub keeps timm's ImageNet weights
    model = build_detector(ModelConfig(backbone="efficientnet_lite0", **HEAD))
    load_backbone_weights(model, tmp_path / file_name)
    assert all(torch.equal(v, state[k]) for k, v in model.backbone.state_dict().items())


@needs_safetensors
def test_a_damaged_safetensors_file_is_one_line(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="model.safetensors is not a readable safetensors file"):
        load_backbone_weights(build_detector(ModelConfig(backbone="efficientnet_lite0", **HEAD)),
                              tmp_path / "model.safetensors")


def test_a_safetensors_file_without_the_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if not installed: importing it raises ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    (tmp_path / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(UserError) as err:
        load_backbone_weights(build_detector(ModelConfig(backbone="efficientnet_lite0", **HEAD)),
                              tmp_path / "model.safetensors")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "model.safetensors") in message
    assert "pip install 'ldcache[backbones]'" in message


# Written by torchvision (torch.save of the state dict, its weights files' format) and by timm
# (save_for_hf's model.safetensors, its hub files' format) in an environment that has them:
# tools/backbone_key_fixtures.py. The i-th entry of the library's state dict holds 1 + i/1024.
LIBRARY_WEIGHTS = {"mobilenet_v2": "mobilenet_v2.pth.xz", "shufflenet_v2_x1_0": "shufflenet_v2_x1_0.pth.xz",
                   "efficientnet_lite0": "efficientnet_lite0.safetensors.xz"}


@pytest.mark.parametrize("name, file", LIBRARY_WEIGHTS.items())
def test_a_weights_file_the_library_wrote_puts_every_tensor_in_its_place(tmp_path, name, file):
    import lzma

    path = tmp_path / file.removesuffix(".xz")
    path.write_bytes(lzma.decompress((FIXTURES / "library_weights" / file).read_bytes()))
    model = build_detector(ModelConfig(backbone=name, num_classes=3, fpn_channels=16, head_channels=16,
                                       stacked_convs=1, gn_groups=4))
    load_backbone_weights(model, path)  # no missing or unexpected key: strict
    library_keys = list(json.loads((FIXTURES / "backbone_keys" / f"{name}.json").read_text())["state_dict"])
    own = model.backbone.state_dict()
    assert len(library_keys) > len(own)  # the file's classifier was left out
    for key, value in own.items():
        i = library_keys.index(key)
        assert torch.all(value == (1 + i / 1024 if value.is_floating_point() else i)), key


def test_a_file_torch_cannot_load_is_named_for_what_it_is(tmp_path):
    whole = tmp_path / "whole.pt"
    torch.save({"state_dict": {"w": torch.zeros(64, 64)}}, whole)
    cases = {
        b"": "(the file is empty)",
        b"hi\n": "(it begins b'hi\\n': neither a torch zip archive nor a pickle)",  # pickle says only "105"
        whole.read_bytes()[:3000]: "(PytorchStreamReader failed reading zip archive: failed finding central directory)",
    }
    for i, (data, reason) in enumerate(cases.items()):
        (tmp_path / f"{i}.pt").write_bytes(data)
        with pytest.raises(UserError) as caught:
            read_checkpoint(tmp_path / f"{i}.pt")
        assert reason in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
