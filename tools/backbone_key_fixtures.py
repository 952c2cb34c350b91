"""Write the backbone key fixtures, and check our backbones against torchvision's and timm's own.

Runs ONLY in an environment with torchvision and timm beside torch (the project's CPU torch cannot
import torchvision's compiled operators, so torchvision::nms is registered first with a pure-torch
stand-in; the classification models never call it), from the repository root:

    /tmp/r25/venv/bin/python tools/backbone_key_fixtures.py [--check-dir /tmp/backbone_check]

Writes tests/fixtures/backbone_keys/<model>.json: the library's full state-dict key -> shape of
each model (one key a line), as the library builds it (tests/detector/test_backbones.py compares ours against it),
and tests/fixtures/library_weights/<model>.<pth|safetensors>.xz: a weights file the library's own code
wrote (write_weights_fixture), which tests/detector/test_checkpoint_backbone.py loads.
Then, per backbone: the library model with random weights and perturbed BatchNorm statistics is
saved with torch.save (the library's file format) under --check-dir, loaded into OUR detector with
detector.checkpoint.load_backbone_weights, and our C3-C5 are compared with the library's
intermediate features on one random 1x3x224x224 image in eval mode (max absolute difference).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "backbone_keys"
WEIGHTS_DIR = ROOT / "tests" / "fixtures" / "library_weights"
WEIGHTS_FIXTURES = ("mobilenet_v2", "shufflenet_v2_x1_0", "efficientnet_lite0")  # one per library file kind
# our backbone name -> (library, model name, the library modules whose outputs are C3, C4, C5)
MODELS = {
    "resnet18": ("torchvision", "resnet18", ("layer2", "layer3", "layer4")),
    "resnet50": ("torchvision", "resnet50", ("layer2", "layer3", "layer4")),
    "mobilenet_v2": ("torchvision", "mobilenet_v2", ("features.6", "features.13", "features.17")),
    "shufflenet_v2_x0_5": ("torchvision", "shufflenet_v2_x0_5", ("stage2", "stage3", "stage4")),
    "shufflenet_v2_x1_0": ("torchvision", "shufflenet_v2_x1_0", ("stage2", "stage3", "stage4")),
    "shufflenet_v2_x1_5": ("torchvision", "shufflenet_v2_x1_5", ("stage2", "stage3", "stage4")),
    "shufflenet_v2_x2_0": ("torchvision", "shufflenet_v2_x2_0", ("stage2", "stage3", "stage4")),
    "efficientnet_lite0": ("timm", "efficientnet_lite0", ("blocks.2", "blocks.4", "blocks.6")),
}


def import_libraries():
    """torchvision and timm, with torchvision's compiled operators stood in for."""
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", lambda dets, scores, iou: torch.zeros(0, dtype=torch.long), "CPU")
    import torchvision.extension

    torchvision.extension._has_ops = lambda: True
    import timm
    import torchvision

    return lib, torchvision, timm  # keep the Library object alive


def library_model(library: str, model: str, torchvision, timm) -> torch.nn.Module:
    if library == "timm":
        return timm.create_model(model, pretrained=False)
    return getattr(torchvision.models, model)(weights=None)


def perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
    """BatchNorm affine and statistics away from 1/0, so the check exercises every stored value."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0, 0.1, generator=generator)
                m.running_mean.normal_(0, 0.1, generator=generator)
                m.running_var.uniform_(0.5, 1.5, generator=generator)


def library_features(model: torch.nn.Module, names: tuple[str, ...], image: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of the named submodules during the library's own forward (forward hooks)."""
    outs: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o))
               for n in names]
    with torch.no_grad():
        model(image)
    for h in handles:
        h.remove()
    return [outs[n] for n in names]


def our_detector(name: str):
    from detector import ModelConfig, build_detector

    arch = dict(backbone="resnet", depth=int(name[6:])) if name.startswith("resnet") else dict(backbone=name)
    return build_detector(ModelConfig(num_classes=3, fpn_channels=32, head_channels=32, gn_groups=8, **arch)).eval()


def write_weights_fixture(name: str, library: str, model: torch.nn.Module, out_dir: Path) -> Path:
    """The library's own weights file of `model`, written by the library's own code (torchvision's
    files are torch.save of the state dict; timm's hub files are save_for_hf's model.safetensors),
    with every tensor filled with one constant: the i-th entry (state-dict order, as in the key
    fixture) holds 1 + i/1024 (an integer entry holds i). A test then sees where each lands, and the
    file compresses to a few KB: it is stored xz-compressed."""
    import lzma
    import tempfile

    with torch.no_grad():
        for i, tensor in enumerate(model.state_dict().values()):
            tensor.fill_(1 + i / 1024 if tensor.is_floating_point() else i)
    with tempfile.TemporaryDirectory() as tmp:
        if library == "timm":
            from timm.models._hub import save_for_hf

            save_for_hf(model, tmp, safe_serialization=True)
            written, suffix = Path(tmp) / "model.safetensors", ".safetensors"
        else:
            written, suffix = Path(tmp) / "weights.pth", ".pth"
            torch.save(model.state_dict(), written)
        out = out_dir / f"{name}{suffix}.xz"
        out.write_bytes(lzma.compress(written.read_bytes(), preset=9))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-dir", type=Path, default=Path("/tmp/backbone_check"))
    parser.add_argument("--weights-fixtures", nargs="*", default=list(WEIGHTS_FIXTURES),
                        help="backbones whose library-written weights file goes to tests/fixtures/library_weights")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from detector.checkpoint import load_backbone_weights

    _, torchvision, timm = import_libraries()
    versions = {"torchvision": torchvision.__version__, "timm": timm.__version__}
    FIXTURES.mkdir(parents=True, exist_ok=True)
    args.check_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for name, (library, model_name, feature_names) in MODELS.items():
        torch.manual_seed(0)
        model = library_model(library, model_name, torchvision, timm).eval()
        perturb(model, generator)
        state = model.state_dict()
        header = {"library": library, "version": versions[library], "model": model_name}
        entries = ",\n".join(f"  {json.dumps(k)}: {json.dumps(list(v.shape))}" for k, v in state.items())
        (FIXTURES / f"{name}.json").write_text(json.dumps(header)[:-1] + ', "state_dict": {\n' + entries + "\n}}\n")
        path = args.check_dir / f"{model_name}.pth"
        torch.save(state, path)
        ours = our_detector(name)
        load_backbone_weights(ours, path)
        image = torch.randn(1, 3, 224, 224, generator=generator)
        expected = library_features(model, feature_names, image)
        with torch.no_grad():
            got = ours.backbone(image)[-3:]
        shapes = [tuple(t.shape) for t in got]
        assert shapes == [tuple(t.shape) for t in expected], (name, shapes)
        diff = max((a - b).abs().max().item() for a, b in zip(got, expected))
        scale = max(b.abs().max().item() for b in expected)
        params = sum(p.numel() for p in ours.backbone.parameters()) / 1e6
        if name in args.weights_fixtures:
            WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
            written = write_weights_fixture(name, library, model, WEIGHTS_DIR)
            print(f"{name:20s} weights fixture {written.relative_to(ROOT)} ({written.stat().st_size:,} bytes)")
        print(f"{name:20s} {library} {versions[library]:8s} keys {len(state):4d}  C3-C5 {shapes}  "
              f"max |ours - library| {diff:.3g} (max |feature| {scale:.3g})  backbone {params:.3f} M params")


if __name__ == "__main__":
    main()
