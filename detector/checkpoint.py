"""Checkpoints: our own format and mmdetection's, both read with torch.load(weights_only=True), and
a .safetensors file (a bare state dict, as the Hugging Face hub keeps timm's ImageNet weights), read
with the optional safetensors package (pip install 'ldcache[backbones]'): the only module that imports it.

Ours: {"format": "ldcache.detector", "format_version": 1, "model_config": {...}, "state_dict": {...},
plus optional "optimizer", "epoch", "iter", "meta"}. mmdetection's: {"state_dict": {...}, "meta":
{...}} with identical parameter names. A bare state dict is accepted as well. Loading is strict: a
checkpoint that does not fit the model raises UserError naming the missing and unexpected keys.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from core.errors import UserError, first_line
from detector.backbones import HEAD_PREFIXES, backbone_in, weights_file
from detector.config import BACKBONE_STAGES, ModelConfig
from detector.model import build_detector

FORMAT = "ldcache.detector"
FORMAT_VERSION = 1


def save_checkpoint(path, model: nn.Module, config: ModelConfig, **extra) -> None:
    """Write model weights + architecture (+ any extra entries such as optimizer, epoch) atomically:
    a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_config": config.to_dict(),
               "state_dict": model.state_dict(), **extra}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def trained_img_scale(ckpt: dict) -> tuple[int, int] | None:
    """The img_scale the checkpoint's run trained at (our checkpoints record it), else None."""
    scale = ckpt.get("run_config", {}).get("data", {}).get("img_scale")
    return tuple(scale) if scale else None


def is_safetensors(path: Path) -> bool:
    """By its name, or by its start (a renamed file): an 8-byte little-endian header length, then the
    JSON header's "{"; torch's files start with a zip's "PK" or a pickle's 0x80."""
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            start = f.read(9)
    except OSError:
        return False  # torch.load's error says what is wrong with it
    return len(start) == 9 and start[8:] == b"{" and 2 <= int.from_bytes(start[:8], "little") < path.stat().st_size


def read_safetensors(path: Path, map_location="cpu") -> dict:
    try:
        from safetensors.torch import load_file  # the optional backbones extra
    except ImportError:
        raise UserError(f"{path} is a .safetensors file, which needs the safetensors package: "
                        "pip install 'ldcache[backbones]'") from None
    try:
        return {"state_dict": load_file(str(path), device=str(map_location))}
    except Exception as err:
        detail = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)[:200]
        raise UserError(f"checkpoint {path} is not a readable safetensors file ({detail}); check the file") from None


def load_failure(path: Path, err: Exception) -> str:
    """Why torch.load failed, in words: pickle's own errors for a file that is neither of torch's
    formats are a bare opcode number ("105") or "Ran out of input"."""
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        return "the file is empty"
    if not head.startswith(b"PK") and not head.startswith(b"\x80"):
        return f"it begins {head!r}: neither a torch zip archive nor a pickle"
    return first_line(err)  # a truncated zip: "... failed finding central directory"


def read_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint file safely -> dict with at least "state_dict" (a .safetensors file gives
    only that)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the path of a .pt/.pth file")
    if is_safetensors(path):
        return read_safetensors(path, map_location)
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        text = str(err)
        if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in text:
            culprit = text.split("Unsupported global:", 1)[1].split(" was not", 1)[0].strip()
            raise UserError(
                f"checkpoint {path} holds a Python object that weights_only loading refuses ({culprit}); re-save just "
                "its weights where you trust it: torch.save({'state_dict': ckpt['state_dict']}, path)"
            ) from None
        raise UserError(f"checkpoint {path} is not a readable torch checkpoint ({load_failure(path, err)}); "
                        "check the file") from None
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        return raw
    if isinstance(raw, dict) and raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        return {"state_dict": raw}
    raise UserError(f"checkpoint {path} has no state_dict; expected an ldcache or mmdetection checkpoint")


def stored_model_config(ckpt: dict) -> ModelConfig | None:
    """The architecture recorded in one of our checkpoints (None for mmdet / bare checkpoints)."""
    if ckpt.get("format") == FORMAT and "model_config" in ckpt:
        return ModelConfig.from_dict(ckpt["model_config"])
    return None


def infer_model_config(state_dict: dict, **overrides) -> ModelConfig:
    """Read the architecture off a GFL state dict (backbone, ResNet depth and width, head widths, tower
    depth, reg_max, classes). GroupNorm groups cannot be seen in the weights; they default to 32
    unless overridden. A --backbone given wins over the keys (strict loading then checks it)."""
    sd = state_dict
    backbone = overrides.get("backbone") or backbone_in(sd)
    if backbone is None and any(k.startswith("backbone.") for k in sd):
        first = next(k for k in sd if k.startswith("backbone."))
        raise UserError(f"the checkpoint records no architecture and its backbone ({first}, ...) is none ldcache "
                        f"builds ({', '.join(BACKBONE_STAGES)}); pass a GFL checkpoint with one of those backbones")
    try:
        stacked = len({k.split(".")[2] for k in sd if k.startswith("bbox_head.cls_convs.")})
        config = dict(
            backbone=backbone or "resnet",  # no backbone.* keys at all: the KeyErrors below say so
            num_classes=sd["bbox_head.gfl_cls.weight"].shape[0],
            fpn_channels=sd["neck.lateral_convs.0.conv.weight"].shape[0],
            head_channels=sd["bbox_head.cls_convs.0.conv.weight"].shape[0]
            if stacked
            else sd["neck.lateral_convs.0.conv.weight"].shape[0],
            stacked_convs=stacked,
            reg_max=sd["bbox_head.gfl_reg.weight"].shape[0] // 4 - 1,
        )
        if config["backbone"] == "resnet":
            layer3_blocks = {k.split(".")[2] for k in sd if k.startswith("backbone.layer3.")}
            bottleneck = "backbone.layer1.0.conv3.weight" in sd
            config["depth"] = {(6, False): 34, (2, False): 18, (6, True): 50, (23, True): 101}[
                (len(layer3_blocks), bottleneck)]
            config["base_width"] = sd["backbone.conv1.weight"].shape[0]
    except (KeyError, IndexError) as err:
        raise UserError(f"the checkpoint is not a GFL detector (missing or unexpected {err}); "
                        "pass a GFL checkpoint from ldcache or mmdetection") from None
    config.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**config)


def resolve_model_config(ckpt: dict, **flags) -> ModelConfig:
    """Architecture for a checkpoint: our stored config, or the one inferred from the weights;
    flags given explicitly must agree with a stored config (a conflict is a UserError)."""
    flags = {k: v for k, v in flags.items() if v is not None}
    stored = stored_model_config(ckpt)
    if stored is None:
        return infer_model_config(ckpt["state_dict"], **flags)
    conflicts = [f"{k}={getattr(stored, k)} (given {v})" for k, v in flags.items() if getattr(stored, k) != v]
    if conflicts:
        raise UserError(f"the checkpoint was trained with {', '.join(conflicts)}; drop those flags or pass "
                        "the checkpoint of that architecture")
    return stored


def fit_problems(own: dict, state_dict: dict) -> str:
    """Empty when state_dict has exactly the keys and shapes of `own` (a module's state dict), else one
    line naming the first few missing, unexpected and mis-shaped keys."""
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mis_shaped = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    parts = []
    for name, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mis_shaped)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            parts.append(f"{name} {keys[:3]}{more}")
    return "; ".join(parts)


def load_state_dict_strict(model: nn.Module, state_dict: dict, source: str = "checkpoint") -> None:
    """Strict load with a one-line error listing missing, unexpected and mis-shaped keys."""
    problems = fit_problems(model.state_dict(), state_dict)
    if problems:
        cfg = getattr(model, "config", None)
        arch = f" ({cfg.backbone_name}, {cfg.num_classes} classes)" if cfg else ""
        raise UserError(f"{source} does not fit the model{arch}: {problems}; "
                        "pass the architecture flags it was trained with")
    model.load_state_dict(state_dict, strict=True)


def load_model(path, arch: dict | None = None, device: torch.device | str = "cpu",
               role: str = "checkpoint", ckpt: dict | None = None) -> tuple[nn.Module, ModelConfig]:
    """A detector built from a checkpoint (ours, or mmdetection's with `arch` flags for what the
    weights do not show), its weights loaded strictly, on `device`, in eval mode. ckpt: the
    checkpoint already read from path (not read again)."""
    ckpt = ckpt if ckpt is not None else read_checkpoint(path)
    config = resolve_model_config(ckpt, **(arch or {}))
    model = build_detector(config)
    load_state_dict_strict(model, ckpt["state_dict"], source=f"{role} {path}")
    return model.to(device).eval(), config


def load_checkpoint(model: nn.Module, path, map_location="cpu") -> dict:
    """Load our or an mmdet checkpoint into `model`, strictly; returns the checkpoint dict."""
    ckpt = read_checkpoint(path, map_location)
    load_state_dict_strict(getattr(model, "module", model), ckpt["state_dict"], source=f"checkpoint {path}")
    return ckpt


def file_sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_backbone_weights(model: nn.Module, path) -> None:
    """ImageNet weights into the backbone, from the file its library publishes (fetched by the user;
    nothing is downloaded here): torchvision's ResNet, MobileNetV2 or ShuffleNetV2 state dict, or
    timm's EfficientNet-Lite0 one, whose classifier entries are dropped; or a detector checkpoint,
    whose `backbone.*` entries are used. Anything else that does not fit is a one-line UserError.
    A BatchNorm's num_batches_tracked may be absent (older files), as torch's own loading allows."""
    net = getattr(model, "module", model)
    config = getattr(net, "config", None) or ModelConfig()
    state = read_checkpoint(path)["state_dict"]
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    else:
        state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES[config.backbone])}
    own = net.backbone.state_dict()
    for key, value in own.items():
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    problems = fit_problems(own, state)
    if problems:
        raise UserError(f"backbone weights {path} does not fit the {config.backbone_name} backbone: {problems}; pass "
                        f"{weights_file(config)} or a detector checkpoint with this backbone")
    net.backbone.load_state_dict(state, strict=True)
