"""mmdetection's side of benchmarks/suite/vs_mmdetection.py, run in the mmdetection oracle venv
(../shared/tools/mmdet_oracle/make_venv.sh): builds mmdetection's own GFL R-18 and LD R-18 <- R-101
(teacher online, Main LD) from its shipped configs with random weights, and times model.loss +
backward + SGD step on the batch the driver saved. It answers the driver's JSON commands on
stdin/stdout (benchmarks/harness/step_worker.py), one model per process: {"build": "gfl" | "ld"}, then
"time" and "profile" commands for it.
"""

import argparse
import logging
import os.path as osp

import mmdet
import torch
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.utils import register_all_modules
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.structures import InstanceData

from benchmarks.harness import step_worker

CONFIGS = osp.join(osp.dirname(mmdet.__file__), ".mim", "configs")
MODEL_CONFIGS = {"gfl": ("gfl/gfl_r50_fpn_1x_coco.py", 18), "ld": ("ld/ld_r18-gflv1-r101_fpn_1x_coco.py", None)}


def build(name: str, device):
    rel, depth = MODEL_CONFIGS[name]
    cfg = Config.fromfile(osp.join(CONFIGS, rel)).model
    cfg.backbone.init_cfg = None  # random weights: nothing is downloaded
    if depth is not None:
        cfg.backbone.depth = depth
        cfg.neck.in_channels = [64, 128, 256, 512]
    if cfg.type == "KnowledgeDistillationSingleStageDetector":
        cfg.teacher_ckpt = None
        cfg.teacher_config = osp.join(CONFIGS, "gfl", "gfl_r101_fpn_ms-2x_coco.py")
    torch.manual_seed(0)
    model = MODELS.build(cfg)
    model.init_weights()
    model.to(device).train()
    if hasattr(model, "teacher_model"):
        model.teacher_model.to(device).eval()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    return model, optimizer


def samples(batch: dict, device) -> list:
    h, w = batch["images"].shape[-2:]
    out = []
    for boxes, labels in zip(batch["boxes"], batch["labels"]):
        sample = DetDataSample()
        sample.set_metainfo(dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), batch_input_shape=(h, w),
                                 scale_factor=(1.0, 1.0)))
        sample.gt_instances = InstanceData(bboxes=boxes.to(device), labels=labels.to(device))
        out.append(sample)
    return out


def step_of(model, optimizer, images, data, amp: bool):
    """model.loss + backward + SGD step, with one loss read-out as our engine does."""
    def step():
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
            losses = model.loss(images, data)
        loss = sum(sum(v) if isinstance(v, list) else v for k, v in losses.items() if "loss" in k)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        float(loss)
    return step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", required=True, help="the .pt file the driver wrote (images, boxes, labels)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true")
    args = p.parse_args()
    register_all_modules()
    MMLogger.get_current_instance().setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = torch.load(args.batch, weights_only=True)
    images, data = batch["images"].to(device), samples(batch, device)

    def build_step(name: str):
        model, optimizer = build(name, device)
        return step_of(model, optimizer, images, data, args.amp), {
            "mmdet": mmdet.__version__,
            "torch": torch.__version__,
        }

    step_worker.serve(build_step, device)


if __name__ == "__main__":
    main()
