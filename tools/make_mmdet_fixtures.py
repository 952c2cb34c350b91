"""Write the golden mmdetection fixtures the parity tests compare against.

Runs ONLY inside the oracle environment built by ../shared/tools/mmdet_oracle/make_venv.sh
(mmdetection 3.3.0 on CPU); the tests that read the fixtures never need mmdetection:

    bash ../shared/tools/mmdet_oracle/make_venv.sh /tmp/mmdet_venv
    /tmp/mmdet_venv/bin/python tools/make_mmdet_fixtures.py --out tests/fixtures

Writes
- mmdet_gfl.pt: per case (small GFL models built from mmdet's own GFL config with random, perturbed
  weights): our ModelConfig, the state dict, a padded batch of images of different sizes, GT boxes,
  mmdet's per-level head outputs, its ATSS assignment per image, its GFL losses, its LD head losses
  for given teacher maps, its test-time detections, and KD-KL loss rows. Tensors and plain Python
  only, so torch.load(weights_only=True) reads it.
- mmdet_gfl_keys.json: state-dict key names and shapes of full-size GFL R-18/34/50/101 (80 classes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch

STRIDES = [8, 16, 32, 64, 128]


def mmdet_imports():
    import mmdet
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.structures import InstanceData

    register_all_modules()
    import logging

    from mmengine.logging import MMLogger
    MMLogger.get_current_instance().setLevel(logging.ERROR)
    config_dir = Path(mmdet.__file__).parent / ".mim" / "configs"
    return Config, InstanceData, MODELS, config_dir


def build_mmdet(depth, num_classes, base_width=64, fpn=256, head=256, stacked=4, gn_groups=32, ld=False):
    Config, _, MODELS, config_dir = mmdet_imports()
    cfg = Config.fromfile(str(config_dir / "gfl" / "gfl_r50_fpn_1x_coco.py"))
    m = cfg.model
    m.backbone.init_cfg = None
    m.backbone.depth = depth
    m.backbone.base_channels = base_width
    expansion = 1 if depth in (18, 34) else 4
    m.neck.in_channels = [base_width * expansion * 2**i for i in range(4)]
    m.neck.out_channels = fpn
    m.bbox_head.in_channels = fpn
    m.bbox_head.feat_channels = head
    m.bbox_head.stacked_convs = stacked
    m.bbox_head.num_classes = num_classes
    m.bbox_head.norm_cfg = dict(type="GN", num_groups=gn_groups, requires_grad=True)
    if ld:
        m.bbox_head.type = "LDHead"
        m.bbox_head.loss_ld = dict(type="KnowledgeDistillationKLDivLoss", loss_weight=0.25, T=10)
    model = MODELS.build(m)
    model.init_weights()
    return model


def perturb(model, gen):
    """Random weights of realistic scale, with non-trivial norm statistics and Scale values, so
    every parameter and buffer influences the outputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 4:
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith("scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        model.bbox_head.gfl_cls.bias.copy_(-2.0 + 0.5 * torch.randn(model.bbox_head.gfl_cls.bias.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))


def make_case(name, arch, image_shapes, canvas, gts, gen):
    """arch: our ModelConfig fields. image_shapes: per image (img_h, img_w) of the resized image;
    canvas: (H, W) of the batch; gts: per image (boxes list, labels list)."""
    _, InstanceData, _, _ = mmdet_imports()
    model = build_mmdet(arch["depth"], arch["num_classes"], arch["base_width"], arch["fpn_channels"],
                        arch["head_channels"], arch["stacked_convs"], arch["gn_groups"])
    perturb(model, gen)
    model.train()  # norm_eval keeps BatchNorm in eval mode; this is the training graph

    B = len(image_shapes)
    images = torch.zeros(B, 3, *canvas)
    metas = []
    for i, (h, w) in enumerate(image_shapes):
        ph, pw = math.ceil(h / 32) * 32, math.ceil(w / 32) * 32
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=gen)
        metas.append(dict(img_shape=(h, w), pad_shape=(ph, pw), batch_input_shape=tuple(canvas),
                          ori_shape=(h, w), scale_factor=(1.0, 1.0)))
    gt_instances = [InstanceData(bboxes=torch.tensor(b, dtype=torch.float32).reshape(-1, 4),
                                 labels=torch.tensor(c, dtype=torch.long)) for b, c in gts]

    feats = model.extract_feat(images)
    cls_scores, bbox_preds = model.bbox_head(feats)
    losses = model.bbox_head.loss_by_feat(cls_scores, bbox_preds, gt_instances, metas)
    losses = {k: float(sum(v).detach()) for k, v in losses.items()}

    # ATSS, called the way GFLHead.get_targets calls it: on the anchors valid for each image.
    head = model.bbox_head
    featmap_sizes = [c.shape[-2:] for c in cls_scores]
    anchor_list, valid_flag_list = head.get_anchors(featmap_sizes, metas, device="cpu")
    assigned = []
    for anchors, flags, gt in zip(anchor_list, valid_flag_list, gt_instances):
        flat_anchors, flat_flags = torch.cat(anchors), torch.cat(flags)
        num_level = [int(f.sum()) for f in flags]
        result = head.assigner.assign(InstanceData(priors=flat_anchors[flat_flags]), num_level, gt)
        assigned.append(result.gt_inds.clone())  # 0 = negative, k = GT k-1

    # LD head (mmdet's Main LD): same student maps, random teacher box logits as soft targets.
    ld_model = build_mmdet(arch["depth"], arch["num_classes"], arch["base_width"], arch["fpn_channels"],
                           arch["head_channels"], arch["stacked_convs"], arch["gn_groups"], ld=True)
    ld_model.load_state_dict(model.state_dict())
    teacher_box = [3.0 * torch.randn(b.shape, generator=gen) for b in bbox_preds]
    ld_losses = ld_model.bbox_head.loss_by_feat(cls_scores, bbox_preds, gt_instances, metas, teacher_box)
    ld_losses = {k: float(sum(v).detach()) for k, v in ld_losses.items()}

    # Test-time decoding, one image at a time on its own padded region: mmdet decodes every
    # location of the batch canvas, which at its test batch size of 1 is the image's own region.
    model.eval()
    detections = []
    with torch.no_grad():
        for i, meta in enumerate(metas):
            ph, pw = meta["pad_shape"]
            own = [(math.ceil(ph / s), math.ceil(pw / s)) for s in STRIDES]
            cls_i = [c[i:i + 1, :, :h, :w] for c, (h, w) in zip(cls_scores, own)]
            box_i = [b[i:i + 1, :, :h, :w] for b, (h, w) in zip(bbox_preds, own)]
            p = model.bbox_head.predict_by_feat(cls_i, box_i, batch_img_metas=[meta], rescale=True)[0]
            detections.append(dict(boxes=p.bboxes.clone(), scores=p.scores.clone(), labels=p.labels.clone()))

    return name, dict(
        model_config=arch,
        state_dict={k: v.clone() for k, v in model.state_dict().items()},
        images=images,
        image_shapes=[list(s) for s in image_shapes],
        gt_boxes=[g.bboxes.clone() for g in gt_instances],
        gt_labels=[g.labels.clone() for g in gt_instances],
        cls_scores=[c.detach().clone() for c in cls_scores],
        bbox_preds=[b.detach().clone() for b in bbox_preds],
        assigned_gt_inds=assigned,
        losses=losses,
        teacher_box=teacher_box,
        ld_losses=ld_losses,
        detections=detections,
    )


def kd_rows(gen):
    from mmdet.models.losses.kd_loss import knowledge_distillation_kl_div_loss

    out = {}
    for T, K in ((10.0, 17), (2.0, 5), (1.0, 80)):
        student = 3 * torch.randn(64, K, generator=gen)
        teacher = 3 * torch.randn(64, K, generator=gen)
        rows = knowledge_distillation_kl_div_loss(student, teacher, T=T, detach_target=True, reduction="none")
        out[f"T{T:g}_K{K}"] = dict(student=student, teacher=teacher, T=T, loss=rows.clone())
    return out


def key_lists():
    keys = {}
    for depth in (18, 34, 50, 101):
        model = build_mmdet(depth, 80)
        keys[str(depth)] = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    return keys


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/fixtures")
    args = parser.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2022)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    small18 = dict(depth=18, num_classes=5, base_width=8, fpn_channels=32, head_channels=32,
                   stacked_convs=2, gn_groups=8)
    small50 = dict(depth=50, num_classes=3, base_width=4, fpn_channels=32, head_channels=32,
                   stacked_convs=1, gn_groups=16)
    cases = dict([
        # Three images of different own sizes in one canvas (the last without GTs): exercises the
        # per-image valid region, boxes at every scale, and an empty image.
        make_case("r18_small", small18, [(120, 155), (90, 130), (60, 64)], (128, 160), [
            ([[10, 12, 60, 70], [30, 40, 150, 110], [100, 20, 118, 34], [5, 5, 152, 118]], [0, 3, 1, 4]),
            ([[20, 10, 80, 85], [90, 50, 128, 88], [60, 60, 66, 64]], [2, 2, 0]),
            ([], []),
        ], gen),
        make_case("r50_small", small50, [(128, 128)], (128, 128), [
            ([[16, 16, 100, 90], [60, 70, 124, 126]], [1, 2]),
        ], gen),
    ])
    payload = dict(mmdet_version=str(__import__("mmdet").__version__), torch_version=str(torch.__version__),
                   cases=cases, kd=kd_rows(gen))
    torch.save(payload, out / "mmdet_gfl.pt")
    (out / "mmdet_gfl_keys.json").write_text(json.dumps(key_lists()))
    size = os.path.getsize(out / "mmdet_gfl.pt") / 1e6
    print(f"wrote {out / 'mmdet_gfl.pt'} ({size:.2f} MB) and {out / 'mmdet_gfl_keys.json'}")
    for name, case in cases.items():
        print(name, "losses", case["losses"], "ld", case["ld_losses"],
              "positives", [int((a > 0).sum()) for a in case["assigned_gt_inds"]],
              "detections", [len(d["scores"]) for d in case["detections"]])


if __name__ == "__main__":
    main()
