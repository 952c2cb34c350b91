"""What a deployed student costs: parameters, FLOPs and CPU latency per image at batch 1 for each
backbone, in PyTorch eager, TorchScript and ONNX Runtime, side by side in one run.

    .venv/bin/python -m benchmarks.suite.deploy_latency                          # CPU: ~15 min on 2 cores
    .venv/bin/python -m benchmarks.suite.deploy_latency --threads 0              # every core (a quiet machine)
    .venv/bin/python -m benchmarks.suite.deploy_latency --backbones mobilenet_v2 --sizes 320 --reps 3   # smoke

Every model is a GFL detector with random weights (latency does not depend on them) and 80
classes, built twice: with mmdetection's GFL head (FPN and head 256 channels, 4 convs per tower)
and with a light head (96 channels, 2 convs), since the head costs more than a light backbone.
Each is saved as a checkpoint and exported with `ldcache export`'s own code (run_export) to ONNX
and TorchScript; the three runtimes then run the same square S x S canvas (S = --sizes), the full
file: network, decoding and NMS. The class bias is set so that about half of the (location, class)
pairs pass the 0.05 score threshold: NMS works on its full candidate budget (1,000 per level), an
upper bound of its cost on real images. "network" is the eager forward alone. FLOPs are counted
by torch's FlopCounterMode on the network forward (2 per multiply-add). Latency: the median of
--reps runs after --warmup, all runtimes with --threads threads (default 1: per-core latency, and
numbers that stay meaningful on a shared machine; 0 = every core).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.harness import common
from detector.checkpoint import save_checkpoint
from detector.config import ModelConfig
from detector.deploy import DeployedDetector
from detector.model import build_detector
from workflows.export import ExportConfig, run_export

SCRIPT = "deploy_latency"
BACKBONES = {"resnet50": {"backbone": "resnet", "depth": 50}, "resnet18": {"backbone": "resnet", "depth": 18},
             "mobilenet_v2": {"backbone": "mobilenet_v2"}, "shufflenet_v2_x1_0": {"backbone": "shufflenet_v2_x1_0"},
             "efficientnet_lite0": {"backbone": "efficientnet_lite0"}}
HEADS = {"gfl": {"fpn_channels": 256, "head_channels": 256, "stacked_convs": 4, "gn_groups": 32},
         "light": {"fpn_channels": 96, "head_channels": 96, "stacked_convs": 2, "gn_groups": 16}}
SCORE_THR = 0.05


def timed(fn, warmup: int, reps: int) -> float:
    """Median wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def onnx_session(path: Path, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(name: str, head: str, sizes: list[int], args, workdir: Path) -> list[dict]:
    config = ModelConfig(num_classes=80, **BACKBONES[name], **HEADS[head])
    torch.manual_seed(0)
    model = build_detector(config).eval()
    with torch.no_grad():  # about half of the pairs above the score threshold: NMS at its full budget
        model.bbox_head.gfl_cls.bias.fill_(torch.logit(torch.tensor(SCORE_THR)).item())
    ckpt = workdir / f"{name}-{head}.pt"
    save_checkpoint(ckpt, model, config)
    files = {fmt: run_export(str(ckpt), ExportConfig(format=fmt, out=str(workdir / f"{name}-{head}.{fmt}")))["out"]
             for fmt in ("onnx", "torchscript")}
    deployed = DeployedDetector(model, config.strides, config.reg_max, config.num_classes, score_thr=SCORE_THR).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript; it still runs
        scripted = torch.jit.load(str(files["torchscript"]))
    session = onnx_session(files["onnx"], args.threads)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    backbone_params = sum(p.numel() for p in model.backbone.parameters()) / 1e6
    rows = []
    for size in sizes:
        images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))
        image_hw = torch.tensor([[size, size]], dtype=torch.long)
        feed = {"images": images.numpy(), "image_hw": image_hw.numpy()}
        with torch.no_grad():
            counter = FlopCounterMode(display=False)
            with counter:
                model(images)
            flops = counter.get_total_flops() / 1e9
            found = int((deployed(images, image_hw)[2] >= 0).sum())
            row = {"backbone": name, "head": head, "size": size, "params_m": params,
                   "backbone_params_m": backbone_params, "gflops": flops, "detections": found,
                   "network_ms": timed(lambda: model(images), args.warmup, args.reps),
                   "eager_ms": timed(lambda: deployed(images, image_hw), args.warmup, args.reps),
                   "torchscript_ms": timed(lambda: scripted(images, image_hw), args.warmup, args.reps),
                   "onnxruntime_ms": timed(lambda: session.run(None, feed), args.warmup, args.reps)}
        row["torchscript_x"] = row["eager_ms"] / row["torchscript_ms"]
        row["onnxruntime_x"] = row["eager_ms"] / row["onnxruntime_ms"]
        rows.append(row)
        print(f"{name:20s} {head:5s} {size:4d}: {row['gflops']:6.2f} GFLOPs, eager {row['eager_ms']:7.1f} ms, "
              f"torchscript {row['torchscript_ms']:7.1f} ms, onnxruntime {row['onnxruntime_ms']:7.1f} ms",
              file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default=",".join(BACKBONES), help=f"comma list of {', '.join(BACKBONES)}")
    parser.add_argument("--heads", default=",".join(HEADS), help="comma list of gfl, light")
    parser.add_argument("--sizes", default="320,640", help="square canvas sides (multiples of 32)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    common.add_run_args(parser, SCRIPT)
    args = parser.parse_args()
    names, heads = args.backbones.split(","), args.heads.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    unknown = [n for n in names if n not in BACKBONES] + [h for h in heads if h not in HEADS]
    if unknown or any(s <= 0 or s % 32 for s in sizes):
        sys.exit(f"error: unknown backbone or head {unknown}, or a size that is no multiple of 32: {sizes}")
    args.threads = args.threads or os.cpu_count()
    torch.set_num_threads(args.threads)
    rows = []
    with common.work_folder(args.workdir) as workdir:
        for name in names:
            for head in heads:
                rows += measure(name, head, sizes, args, workdir)
    columns = [("backbone", "backbone", ""), ("head", "head", ""), ("size", "px", ""),
               ("params_m", "params M", ".2f"), ("backbone_params_m", "backbone M", ".2f"),
               ("gflops", "GFLOPs", ".2f"), ("network_ms", "network ms", ".1f"), ("eager_ms", "eager ms", ".1f"),
               ("torchscript_ms", "TorchScript ms", ".1f"), ("onnxruntime_ms", "ONNX Runtime ms", ".1f"),
               ("torchscript_x", "TS x eager", ".2f"), ("onnxruntime_x", "ORT x eager", ".2f")]
    table = common.markdown_table(rows, columns)
    device = torch.device("cpu")
    header = (f"GFL, 80 classes, random weights, batch 1, square canvas, score threshold {SCORE_THR} with about half "
              f"of the pairs above it (NMS at its full budget); {args.threads} threads; medians of {args.reps} runs")
    print("\n" + header + "\n\n" + table)
    out = common.write_results(args.out, args, rows, device, header=header, table=table)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
