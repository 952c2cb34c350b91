"""The light-weight backbones (detector/backbones/): outputs, training, checkpoints, and their
libraries' ImageNet files (key names and shapes from tests/fixtures/backbone_keys/, written by
torchvision and timm themselves: tools/backbone_key_fixtures.py)."""

import json

import pytest
import torch

from core.errors import UserError
from detector import ModelConfig, build_detector, save_checkpoint
from detector.atss import assign_batch
from detector.backbones import HEAD_PREFIXES
from detector.checkpoint import load_backbone_weights, load_model
from detector.gfl_loss import gfl_losses
from detector.rows import flatten_rows
from tests.cli_runner import assert_user_error, run_cli
from tests.conftest import FIXTURES

LIGHT = ("mobilenet_v2", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
         "efficientnet_lite0")
HEAD = dict(num_classes=3, fpn_channels=32, head_channels=32, stacked_convs=1, gn_groups=8)
TINY_RESNET = dict(backbone="resnet", depth=18, base_width=8)
# What frozen_stages=1 freezes (stem + stage 1), written from each library's layout, not from our code.
FROZEN_AT_1 = {
    "resnet": ("conv1.", "bn1.", "layer1."),
    "mobilenet_v2": ("features.0.", "features.1.", "features.2.", "features.3."),
    "efficientnet_lite0": ("conv_stem.", "bn1.", "blocks.0.", "blocks.1."),
    **{name: ("conv1.", "stage2.") for name in LIGHT if name.startswith("shufflenet")},
}
# Declared C3-C5 channels (torchvision's / timm's feature_info).
CHANNELS = {"mobilenet_v2": [32, 96, 320], "shufflenet_v2_x0_5": [48, 96, 192], "shufflenet_v2_x1_0": [116, 232, 464],
            "shufflenet_v2_x1_5": [176, 352, 704], "shufflenet_v2_x2_0": [244, 488, 976],
            "efficientnet_lite0": [40, 112, 320]}


def stage_of(name: str, key: str) -> int:
    """Which of C3 (1), C4 (2), C5 (3) the block holding `key` computes (0: before C3), by each
    library's layout."""
    top, index = key.split(".")[:2]
    if name == "mobilenet_v2":
        return sum(int(index) > end for end in (3, 6, 13)) if top == "features" else 0
    if name == "efficientnet_lite0":
        return sum(int(index) > end for end in (1, 2, 4)) if top == "blocks" else 0
    return {"layer2": 1, "layer3": 2, "layer4": 3, "stage2": 1, "stage3": 2, "stage4": 3}.get(top, 0)


def config_of(name: str, **kw) -> ModelConfig:
    arch = TINY_RESNET if name == "resnet" else dict(backbone=name)
    return ModelConfig(**HEAD, **arch, **kw)


def fixture_keys(name: str) -> dict[str, list[int]]:
    return json.loads((FIXTURES / "backbone_keys" / f"{name}.json").read_text())["state_dict"]


def library_file(name: str, path, generator: torch.Generator, drop_counters: bool = False):
    """A file as the library saves its model: every key of its state dict (classifier included)."""
    state = {}
    for key, shape in fixture_keys(name).items():
        if key.endswith("num_batches_tracked"):
            if not drop_counters:
                state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator)
    torch.save(state, path)
    return state


@pytest.mark.parametrize("name", LIGHT)
def test_backbone_gives_c3_c5_at_strides_8_16_32(name):
    backbone = build_detector(config_of(name)).backbone.eval()
    with torch.no_grad():
        outs = backbone(torch.randn(2, 3, 64, 96))
    assert backbone.out_channels == CHANNELS[name]
    assert [tuple(o.shape) for o in outs] == [(2, c, 64 // s, 96 // s) for c, s in zip(CHANNELS[name], (8, 16, 32))]


@pytest.mark.parametrize("name", ("resnet", *LIGHT))
def test_one_training_step_moves_all_but_the_frozen_stages(name):
    torch.manual_seed(0)
    model = build_detector(config_of(name)).train()  # frozen_stages=1, norm_eval: the defaults
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(2, 3, 64, 64)
    boxes = [torch.tensor([[4.0, 6.0, 40.0, 50.0]]), torch.tensor([[10.0, 10.0, 30.0, 26.0], [30.0, 8.0, 60.0, 60.0]])]
    labels = [torch.tensor([0]), torch.tensor([2, 1])]
    cls_out, box_out = model(images)
    level_hw = [[tuple(m.shape[-2:]) for m in cls_out]] * 2
    assign = assign_batch(level_hw, boxes, labels, model.config.strides, 3)
    losses = gfl_losses(flatten_rows(cls_out, level_hw), flatten_rows(box_out, level_hw), assign, 16).losses
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sum(losses.values()).backward()
    optimizer.step()
    after = model.backbone.state_dict()
    frozen = [k for k in after if k.startswith(FROZEN_AT_1[name])]
    trained = [k for k, p in model.backbone.named_parameters() if not k.startswith(FROZEN_AT_1[name])]
    assert frozen and trained
    assert all(torch.equal(after[k], before[f"backbone.{k}"]) for k in frozen)
    assert not any(p.requires_grad for k, p in model.backbone.named_parameters() if k.startswith(FROZEN_AT_1[name]))
    # Every trainable weight gets a gradient (with random weights and held statistics some are too
    # small to move a weight of 1.0 in float32), and weights move in each trained stage.
    grads = dict(model.backbone.named_parameters())
    assert all(grads[k].grad is not None and grads[k].grad.abs().max() > 0 for k in trained)
    moved = [k for k in trained if not torch.equal(after[k], before[f"backbone.{k}"])]
    assert {stage_of(name, k) for k in moved} == {stage_of(name, k) for k in trained}
    stats = [k for k in after if k.endswith(("running_mean", "running_var"))]
    assert all(torch.equal(after[k], before[f"backbone.{k}"]) for k in stats)  # norm_eval: statistics held
    assert not torch.equal(model.bbox_head.gfl_cls.weight, before["bbox_head.gfl_cls.weight"])


@pytest.mark.parametrize("name", LIGHT)
def test_frozen_stages_hold_their_statistics_without_norm_eval(name):
    model = build_detector(config_of(name, frozen_stages=1, norm_eval=False)).train()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items() if k.endswith("running_mean")}
    model.backbone(torch.randn(2, 3, 64, 64))
    after = model.backbone.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    # Batch statistics update every BatchNorm outside the stem and stage 1, and none inside.
    assert moved == {k for k in before if not k.startswith(FROZEN_AT_1[name])}


def test_frozen_stages_beyond_a_backbone_and_resnet_options_are_refused():
    with pytest.raises(UserError, match="frozen_stages \\(4\\) exceeds the 3 stages of backbone shufflenet_v2_x1_0"):
        ModelConfig(backbone="shufflenet_v2_x1_0", frozen_stages=4)
    with pytest.raises(UserError, match="depth and base_width are ResNet options"):
        ModelConfig(backbone="mobilenet_v2", depth=18)
    assert ModelConfig(backbone="mobilenet_v2", frozen_stages=4).frozen_stages == 4  # MobileNetV2 has 4 stages


@pytest.mark.parametrize("name", LIGHT)
def test_checkpoint_rebuilds_the_backbone_with_no_flags(tmp_path, name):
    torch.manual_seed(0)
    config = config_of(name)
    model = build_detector(config).eval()
    save_checkpoint(tmp_path / "det.pt", model, config)
    loaded, loaded_config = load_model(tmp_path / "det.pt")
    assert loaded_config == config and loaded_config.backbone == name
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for a, b in zip(sum(model(images), []), sum(loaded(images), [])):
            assert torch.equal(a, b)


def test_a_config_without_backbone_is_a_resnet(tmp_path):
    old = config_of("resnet").to_dict()
    del old["backbone"]
    assert ModelConfig.from_dict(old).backbone == "resnet"
    assert type(build_detector(ModelConfig.from_dict(old)).backbone).__name__ == "ResNet"
    # An older checkpoint (no "backbone" in its model_config) loads unchanged.
    save_checkpoint(tmp_path / "old.pt", build_detector(config_of("resnet")), config_of("resnet"))
    ckpt = torch.load(tmp_path / "old.pt", weights_only=True)
    del ckpt["model_config"]["backbone"]
    torch.save(ckpt, tmp_path / "old.pt")
    assert load_model(tmp_path / "old.pt")[1] == config_of("resnet")


@pytest.mark.parametrize("name", (*LIGHT, "resnet18", "resnet50"))
def test_our_keys_plus_the_library_head_are_the_library_keys(name):
    library = fixture_keys(name)
    ours = build_detector(config_of(name) if name in LIGHT else ModelConfig(
        num_classes=3, depth=int(name[6:]))).backbone.state_dict()
    head = HEAD_PREFIXES[name if name in LIGHT else "resnet"]
    dropped = {k for k in library if k.startswith(head)}
    assert dropped and not dropped & set(ours)  # each prefix drops something, and only the classifier
    assert set(ours) | dropped == set(library)
    assert all(list(v.shape) == library[k] for k, v in ours.items())


@pytest.mark.parametrize("name", LIGHT)
def test_a_library_file_loads_into_the_backbone(tmp_path, name):
    generator = torch.Generator().manual_seed(0)
    state = library_file(name, tmp_path / "imagenet.pth", generator)
    model = build_detector(config_of(name))
    head_before = model.bbox_head.gfl_cls.weight.clone()
    load_backbone_weights(model, tmp_path / "imagenet.pth")
    ours = model.backbone.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in ours.items())  # every value lands under its own name
    assert torch.equal(model.bbox_head.gfl_cls.weight, head_before)  # only the backbone


def test_a_file_without_batch_counters_loads(tmp_path):
    # Files saved before torch 0.4.1 have no num_batches_tracked; torch's own loading accepts them.
    library_file("mobilenet_v2", tmp_path / "old.pth", torch.Generator().manual_seed(0), drop_counters=True)
    load_backbone_weights(build_detector(config_of("mobilenet_v2")), tmp_path / "old.pth")


@pytest.mark.parametrize("file_of, model_of, fragments", [
    ("shufflenet_v2_x1_0", "mobilenet_v2", ("mobilenet_v2 backbone", "missing keys ['features.0.0.weight'",
                                            "unexpected keys ['conv1.0.weight'", "mobilenet_v2-b0353104.pth")),
    # Same names, other widths: refused on shapes.
    ("shufflenet_v2_x1_0", "shufflenet_v2_x0_5",
     ("shape mismatches ['stage2.0.branch1.2.weight (58, 24, 1, 1) vs (24, 24, 1, 1)'",
      "shufflenetv2_x0.5-f707e7126e.pth")),
    ("mobilenet_v2", "efficientnet_lite0", ("efficientnet_lite0 backbone", "efficientnet_lite0_ra-37913777.pth")),
    ("efficientnet_lite0", "resnet", ("R-18 x0.125 width backbone", "resnet18-*.pth")),
])
def test_a_file_of_another_architecture_is_refused_in_one_line(tmp_path, file_of, model_of, fragments):
    path = tmp_path / f"{file_of}.pth"
    library_file(file_of, path, torch.Generator().manual_seed(0))
    with pytest.raises(UserError) as err:
        load_backbone_weights(build_detector(config_of(model_of)), path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "does not fit" in message
    for fragment in fragments:
        assert fragment in message, message


def test_an_unknown_backbone_is_a_usage_error(tmp_path):
    proc = run_cli("train-detector", "--backbone", "nope", "--out", tmp_path / "run")
    assert_user_error(proc, "--backbone", "nope")
    assert not (tmp_path / "run").exists()
    # Valid names the other options exclude: one line too, before any data is generated.
    for flags, fragment in ((["--backbone", "mobilenet_v2", "--depth", "18"], "are ResNet options"),
                            (["--backbone", "shufflenet_v2_x1_0", "--frozen-stages", "4"], "exceeds the 3 stages")):
        proc = run_cli("train-detector", *flags, "--out", tmp_path / "run", env_home=tmp_path / "home")
        assert_user_error(proc, fragment)
        assert not (tmp_path / "run").exists() and not (tmp_path / "home").exists()


def test_backbone_name_is_what_messages_print():
    assert ModelConfig().backbone_name == "R-50"
    assert ModelConfig(depth=18, base_width=16).backbone_name == "R-18 x0.25 width"  # a quarter of ResNet's 64
    assert ModelConfig(backbone="shufflenet_v2_x1_0").backbone_name == "shufflenet_v2_x1_0"  # no depth for it
    assert [config_of(name).backbone_name for name in LIGHT] == list(LIGHT)
