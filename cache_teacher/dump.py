"""dump-teacher: run a GFL teacher once over every view of a dataset and store its logits.

Pipeline: DataLoader workers build view inputs (the shared transform) in layout order -> teacher
forward (eval, no grad, autocast on CUDA) on batches of equal canvas -> rows encoded on the device
-> copied to host -> a writer thread fills whole shards and stores them, so writing overlaps the
next forwards. Re-running the same command resumes: shards already stored are skipped, the others
are recomputed and written whole, giving the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from cache_teacher import schema
from cache_teacher.codec import all_finite, encode_rows
from cache_teacher.dump_config import DumpConfig, package_version, resolve_dump
from cache_teacher.layout import Layout, plan_layout
from cache_teacher.reader import is_url, open_group
from cache_teacher.writer import CacheWriter
from detector.checkpoint import file_sha256, load_model
from detector.coco import CocoDetection, collate
from detector.distributed import barrier, init_from_env, run_on_main
from detector.errors import UserError
from detector.regions import distillation_rows
from detector.rows import flatten_rows
from detector.runtime import autocast_for, progress_bar, resolve_device
from detector.views import parse_views


def _open_store(cfg: DumpConfig, meta: schema.CacheMetadata, layout: Layout, dataset, num_specs: int) -> CacheWriter:
    """Resume a store of the same identity; create a new one; refuse to replace anything else."""
    existing = None
    try:
        group = open_group(cfg.out, "r", cfg.storage_options)
        existing = dict(group.attrs.get(schema.ATTRS_KEY, {}))
        if not existing and not list(group.keys()):
            group = None  # an empty group (a dump killed as it began): nothing to lose
    except UserError:
        group = None  # nothing there yet
    if group is not None:
        diffs = None
        if schema.is_cache_document(existing):
            try:
                diffs = schema.CacheMetadata.from_json(existing, cfg.out).identity_differences(meta)
            except UserError:  # another format version, or damaged: not ours to resume
                diffs = ["format"]
        if diffs == []:
            writer = CacheWriter.resume(cfg.out, cfg.storage_options)
            if writer is not None:
                return writer
            group = None  # killed while being created: nothing was written, create it again
        elif not cfg.overwrite:
            if diffs is not None:
                raise UserError(f"{cfg.out} holds a cache of another identity (differs in {', '.join(diffs)}); "
                                "pass --overwrite to replace it or choose another --out")
            raise UserError(f"{cfg.out} exists and is not an ldcache cache; choose another --out or pass --overwrite")
    elif not is_url(cfg.out):
        _check_writable(cfg.out)
    try:
        return CacheWriter.create(cfg.out, meta, layout, dataset.image_ids, num_specs, cfg.storage_options,
                                  image_digests=dataset.image_digests())
    except OSError as err:  # not permitted, a file in the way, disk full...
        raise UserError(f"cannot write {cfg.out} ({err.strerror or err}); choose a writable --out") from None


def _check_writable(path: str) -> None:
    """Fail before any view is computed, not when the first shard is written."""
    parent = Path(path).resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {path}: {parent} is not a writable folder; choose a writable --out")


class ShardAssembler:
    """Runs in the writer thread: copies encoded view rows into whole-shard buffers and stores a
    shard as soon as all its views arrived."""

    def __init__(self, writer: CacheWriter, layout: Layout, names: dict[str, str]):
        self.writer, self.layout, self.names = writer, layout, names  # names: encoded key -> array name
        self.buffers: dict[int, dict[str, np.ndarray]] = {}
        self.missing: dict[int, int] = {}
        self.bytes_written = 0

    def add(self, views: list[int], encoded: dict[str, np.ndarray]) -> None:
        """encoded: arrays holding the batch's views one after another (view v: num_rows[v] rows)."""
        start = 0
        for v in views:
            rows = int(self.layout.num_rows[v])
            shard = int(self.layout.shard_of_view[v])
            if shard not in self.buffers:
                self.buffers[shard] = {
                    self.names[k]: np.full((self.layout.rows_per_shard, *a.shape[1:]), -1 if k == "location" else 0,
                                           a.dtype) for k, a in encoded.items()}
                self.missing[shard] = len(self.layout.views_of_shard(shard))
            local = int(self.layout.row_offset[v]) - shard * self.layout.rows_per_shard
            for key, array in encoded.items():
                self.buffers[shard][self.names[key]][local:local + rows] = array[start:start + rows]
                self.bytes_written += array[start:start + rows].nbytes  # the rows, not the shard's padding
            start += rows
            self.missing[shard] -= 1
            if self.missing[shard] == 0:
                buffers = self.buffers.pop(shard)
                self.writer.write_shard(shard, buffers)


def _writer_loop(work: queue.Queue, assembler: ShardAssembler, layout: Layout, errors: list) -> None:
    while True:
        item = work.get()
        if item is None:
            return
        if errors:
            continue  # drain after a failure so the producer never blocks
        views, encoded, event = item
        try:
            if event is not None:
                event.synchronize()  # the device-to-host copy of this batch has landed
            encoded = {k: t.numpy() for k, t in encoded.items()}
            finite_rows = all_finite({k: a for k, a in encoded.items() if k != "location"})
            bounds = np.cumsum([0] + [int(layout.num_rows[v]) for v in views])
            finite = np.array([finite_rows[a:b].all() for a, b in zip(bounds[:-1], bounds[1:])])
            if not finite.all():
                rec = layout.records[views[int(np.argmin(finite))]]
                raise UserError(f"the teacher produced NaN or inf logits on image {rec.image_id} "
                                f"({'hflip' if rec.flip else 'orig'} view at {rec.img_scale}); check the checkpoint "
                                "(nothing was written for this shard)")
            assembler.add(views, encoded)
        except BaseException as err:  # handed to the main thread
            errors.append(err)


def run_dump(cfg: DumpConfig, progress: bool = True) -> dict:
    """Under torchrun every rank owns whole shards (shard s belongs to rank s % world size), rank 0
    creates or resumes the store before the others open it and finalises it after all finished."""
    cfg = resolve_dump(cfg)
    dist_info = init_from_env(cfg.device)
    device = resolve_device(cfg.device, dist_info.local_rank if dist_info.enabled else None)
    progress = progress and dist_info.is_main
    teacher, teacher_cfg = load_model(cfg.teacher, cfg.arch, device, role="teacher checkpoint")
    specs = parse_views(cfg.views, cfg.img_scale, cfg.extra_scales)
    dataset = CocoDetection(cfg.images, cfg.ann, views=specs, strides=teacher_cfg.strides, train=True)
    if dataset.num_classes != teacher_cfg.num_classes:
        raise UserError(f"the teacher predicts {teacher_cfg.num_classes} classes but {cfg.ann} has "
                        f"{dataset.num_classes}; dump with the teacher trained for this dataset")
    dataset.check_files()
    box_width = 4 * (teacher_cfg.reg_max + 1)
    row_bytes = box_width * np.dtype(cfg.box_dtype).itemsize + (
        teacher_cfg.num_classes * np.dtype(cfg.cls_dtype).itemsize if cfg.cls_dtype else 0)
    sparse = cfg.store_regions != "dense"
    region_rows = plan_region_rows(dataset, cfg.min_vlr_gamma, cfg.vlr_iou, cfg.workers, progress) if sparse else None  # [image][spec] -> dense row indices
    layout = plan_layout([[dataset.view_record(i, s) for s in range(len(specs))] for i in range(len(dataset))],
                                row_bytes=row_bytes + (4 if sparse else 0), shard_mb=cfg.shard_mb,
                                rows_per_view=[[len(r) for r in rows] for rows in region_rows] if sparse else None)
    regions = schema.Regions()
    if sparse:
        regions = schema.Regions(cfg.store_regions, cfg.min_vlr_gamma, cfg.vlr_iou, "atss-topk9",
                                 int(layout.num_rows.sum()), int(sum(r.num_rows for r in layout.records)))
    meta = schema.build_metadata(
        teacher_config=teacher_cfg.to_dict(), teacher_sha256=file_sha256(cfg.teacher), ann_sha256=dataset.ann_sha256,
        image_ids=dataset.image_ids, specs=specs, strides=teacher_cfg.strides,
        reg_max=teacher_cfg.reg_max, num_classes=teacher_cfg.num_classes, box_dtype=cfg.box_dtype,
        cls_dtype=cfg.cls_dtype, layout=layout, compressor=cfg.compressor, package_version=package_version(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        source={"teacher": cfg.teacher, "images": cfg.images, "ann": cfg.ann}, regions=regions,
    )
    opened = {}

    def open_on_main():
        opened["writer"] = _open_store(cfg, meta, layout, dataset, len(specs))

    run_on_main(open_on_main, dist_info)  # a refusal on rank 0 stops every rank
    writer = opened.get("writer") or CacheWriter.resume(cfg.out, cfg.storage_options)
    done = writer.shards_done()
    todo = [s for s in range(layout.num_shards) if not done[s] and s % dist_info.world_size == dist_info.rank]
    batches = [b for s in todo for b in layout.batches_of_shard(s, cfg.batch_size)]
    num_views = sum(len(b) for b in batches)

    names = {"box.data": schema.BOX, "box.lo": schema.BOX_LO, "box.scale": schema.BOX_SCALE, "cls.data": schema.CLS,
             "location": schema.LOCATION}
    assembler = ShardAssembler(writer, layout, names)
    work: queue.Queue = queue.Queue(maxsize=4)
    errors: list = []
    thread = threading.Thread(target=_writer_loop, args=(work, assembler, layout, errors), daemon=True)
    thread.start()
    keys = [[(int(layout.image_index[v]), int(layout.spec_index[v])) for v in b] for b in batches]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=keys, num_workers=cfg.workers, collate_fn=collate,
                                         pin_memory=device.type == "cuda")
    cuda = device.type == "cuda"
    if cuda:  # the same bytes on every run (resume) need deterministic kernels
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    start = time.perf_counter()
    bar = progress_bar(total=num_views, desc="dump-teacher", unit="view", disable=not progress, dynamic_ncols=True)
    try:
        with torch.no_grad():
            for views, batch in zip(batches, loader):
                if errors:
                    break
                with autocast_for(device, cfg.amp):
                    cls_maps, box_maps = teacher(batch.images.to(device, non_blocking=True))
                level_hw = [layout.records[v].level_hw for v in views]  # equal canvases: the maps' own sizes
                box_rows, cls_rows = flatten_rows(box_maps, level_hw), flatten_rows(cls_maps, level_hw)  # [B * n, K]
                if sparse:  # keep only the rows the distillation losses read
                    picks = [region_rows[layout.image_index[v]][layout.spec_index[v]] for v in views]
                    n = layout.records[views[0]].num_rows  # equal canvases: equal dense rows
                    take = torch.cat([p.long() + i * n for i, p in enumerate(picks)]).to(box_rows.device)
                    box_rows, cls_rows = box_rows[take], cls_rows[take]
                encoded = {f"box.{k}": t for k, t in encode_rows(box_rows, cfg.box_dtype, teacher_cfg.reg_max).items()}
                if cfg.cls_dtype is not None:
                    encoded["cls.data"] = encode_rows(cls_rows, cfg.cls_dtype)["data"]
                if sparse:
                    encoded["location"] = torch.cat(picks)
                event = None
                if cuda:
                    encoded = {k: _to_pinned(t) for k, t in encoded.items()}
                    event = torch.cuda.Event()
                    event.record()
                work.put((views, encoded, event))
                bar.update(len(views))
                seconds = time.perf_counter() - start
                bar.set_postfix(MBps=f"{assembler.bytes_written / 2**20 / max(seconds, 1e-9):.1f}", refresh=False)
    finally:
        work.put(None)
        thread.join()
        bar.close()
    if errors:
        raise errors[0]
    seconds = time.perf_counter() - start
    barrier()  # every rank's shards are stored
    if dist_info.is_main and writer.shards_done().all():
        writer.finalize()
    barrier()
    return {"views": num_views, "seconds": seconds, "shards_written": len(todo), "num_shards": layout.num_shards,
            "complete": writer.meta.complete, "bytes_written": assembler.bytes_written,
            "already_complete": not todo and writer.meta.complete}


def format_dump_result(result: dict, out: str) -> str:
    """One line for the user about a finished run_dump."""
    if result["already_complete"]:
        return f"{out} is already complete; nothing to do"
    share = " (rank 0's share)" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    return (f"wrote {result['views']:,} views{share} ({result['bytes_written'] / 2**20:,.1f} MiB of rows) in "
            f"{result['seconds']:.1f} s ({result['views'] / max(result['seconds'], 1e-9):.1f} views/s); "
            f"{'complete' if result['complete'] else 'incomplete'}: {out}")


class _RegionRows(torch.utils.data.Dataset):
    """Image i -> for each of its views, the dense row indices a region-sparse cache stores."""

    def __init__(self, dataset: CocoDetection, min_vlr_gamma: float, vlr_iou: str):
        self.dataset, self.min_vlr_gamma, self.vlr_iou = dataset, min_vlr_gamma, vlr_iou

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        out = []
        for s in range(len(self.dataset.views)):
            record = self.dataset.view_record(i, s)
            boxes, _ = self.dataset.view_boxes(i, record)
            rows = distillation_rows(record.level_hw, boxes, self.dataset.strides, self.min_vlr_gamma, self.vlr_iou)
            out.append(rows.to(torch.int32))
        return out


def _as_is(item):
    return item


def plan_region_rows(dataset: CocoDetection, min_vlr_gamma: float, vlr_iou: str, workers: int = 0,
                     progress: bool = False) -> list[list[torch.Tensor]]:
    """The stored rows of every view of a region-sparse cache, from the annotations alone (ATSS and
    the VLR band per view, in loader workers): known before the teacher runs, like dense offsets."""
    loader = torch.utils.data.DataLoader(_RegionRows(dataset, min_vlr_gamma, vlr_iou), batch_size=None,
                                         num_workers=workers, collate_fn=_as_is)
    return [rows for rows in progress_bar(loader, total=len(dataset), desc="plan regions", unit="img", disable=not progress,
                                  leave=False)]


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host

