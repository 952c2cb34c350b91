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
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from cache_teacher import schema
from cache_teacher.codec import all_finite, encode_edges, encode_rows, encode_topk
from cache_teacher.dump_config import DumpConfig, package_version, resolve_dump
from cache_teacher.layout import Layout
from cache_teacher.plan import plan_dump, shard_batches, view_keys
from cache_teacher.reader import is_url, open_group
from cache_teacher.writer import CacheWriter, what_is_at
from core.distributed import barrier, init_from_env, run_on_main
from core.errors import UserError
from core.runtime import autocast_for, compute_precision, progress_bar, resolve_device
from data.coco import CocoDetection, collate
from data.views import parse_views
from detector.checkpoint import file_sha256, load_model
from detector.rows import flatten_rows


def _open_store(cfg: DumpConfig, meta: schema.CacheMetadata, layout: Layout, dataset, num_specs: int) -> CacheWriter:
    """Resume a store of the same identity; create a new one; refuse to replace anything else."""
    existing = None
    try:
        group = open_group(cfg.out, "r", cfg.storage_options)
        existing = dict(group.attrs.get(schema.ATTRS_KEY, {}))
        if not existing and not list(group.keys()):
            group = None  # an empty group (a dump killed as it began): nothing to lose
    except UserError:
        group = None  # nothing there yet, or something that is not a Zarr group
        found = what_is_at(cfg.out, cfg.storage_options)  # creating the store would delete it
        if found == "other":
            raise UserError(f"{cfg.out} exists and holds files that are not a Zarr store; --overwrite replaces only "
                            "a Zarr store: choose another --out (a new folder)") from None
        if found == "zarr" and not cfg.overwrite:
            raise UserError(f"{cfg.out} exists and is not an ldcache cache (a Zarr store that is not a readable "
                            "group); choose another --out or pass --overwrite") from None
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
            if diffs == ["precision"]:
                began = schema.CacheMetadata.from_json(existing, cfg.out).precision
                raise UserError(f"{cfg.out} was begun computing the teacher in {began} and this run computes in "
                                f"{meta.precision}; resume it with the --device and --amp that began it, or pass "
                                "--overwrite to start again")
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


# Encoded keys (codec outputs) -> the arrays that store them.
ARRAY_OF_KEY = {"box.data": schema.BOX, "box.lo": schema.BOX_LO, "box.scale": schema.BOX_SCALE, "cls.data": schema.CLS,
                "location": schema.LOCATION, "edges": schema.EDGES, "cls.topk": schema.CLS_TOPK,
                "cls.index": schema.CLS_INDEX, "cls.floor": schema.CLS_FLOOR}


class ShardAssembler:
    """Runs in the writer thread: copies encoded view rows into whole-shard buffers and stores a
    shard as soon as all its views arrived. An ld+bckd cache's box arrays live in the region row
    space (space_of), everything else in the view's dense (or, region-sparse, only) rows."""

    def __init__(self, writer: CacheWriter, layout: Layout, space_of: dict[str, str]):
        self.writer, self.layout, self.space_of = writer, layout, space_of  # encoded key -> "rows" / "region"
        self.buffers: dict[int, dict[str, np.ndarray]] = {}
        self.missing: dict[int, int] = {}
        self.bytes_written = 0

    def add(self, views: list[int], encoded: dict[str, np.ndarray]) -> None:
        """encoded: arrays holding the batch's views one after another (view v: its rows in the
        array's space)."""
        starts = dict.fromkeys(encoded, 0)
        for v in views:
            shard = int(self.layout.shard_of_view[v])
            if shard not in self.buffers:
                self.buffers[shard] = {
                    ARRAY_OF_KEY[k]: np.full((self.layout.rows_of(self.space_of[k])[2], *a.shape[1:]),
                                             -1 if k == "location" else 0, a.dtype) for k, a in encoded.items()}
                self.missing[shard] = len(self.layout.views_of_shard(shard))
            for key, array in encoded.items():
                offsets, counts, per_shard = self.layout.rows_of(self.space_of[key])
                rows, local = int(counts[v]), int(offsets[v]) - shard * per_shard
                self.buffers[shard][ARRAY_OF_KEY[key]][local:local + rows] = array[starts[key]:starts[key] + rows]
                self.bytes_written += array[starts[key]:starts[key] + rows].nbytes  # rows, not the padding
                starts[key] += rows
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
            finite = np.ones(len(views), dtype=bool)
            for space in set(assembler.space_of.values()):
                arrays = {k: a for k, a in encoded.items() if assembler.space_of[k] == space and k != "location"}
                if arrays:
                    finite_rows = all_finite(arrays)
                    bounds = np.cumsum([0] + [int(layout.rows_of(space)[1][v]) for v in views])
                    finite &= np.array([finite_rows[a:b].all() for a, b in zip(bounds[:-1], bounds[1:])])
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
    data = cfg.data
    specs = parse_views(data.views, data.img_scale, data.extra_scales)
    dataset = CocoDetection(data.images, data.ann, views=specs, strides=teacher_cfg.strides, train=True)
    if dataset.num_classes != teacher_cfg.num_classes:
        raise UserError(f"the teacher predicts {teacher_cfg.num_classes} classes but {data.ann} has "
                        f"{dataset.num_classes}; dump with the teacher trained for this dataset")
    dataset.check_files()
    sparse, two = cfg.store_regions != "dense", cfg.store_regions == "ld+bckd"  # two row spaces
    plan = plan_dump(dataset, teacher_cfg, box_dtype=cfg.box_dtype, cls_dtype=cfg.cls_dtype, shard_mb=cfg.shard_mb,
                     store_regions=cfg.store_regions, min_vlr_gamma=cfg.min_vlr_gamma, vlr_iou=cfg.vlr_iou,
                     cls_topk=cfg.cls_topk, workers=cfg.workers, progress=progress)
    layout, regions, region_rows, topk = plan.layout, plan.regions, plan.region_rows, plan.regions.cls_topk
    meta = schema.build_metadata(
        teacher_config=teacher_cfg.to_dict(), teacher_sha256=file_sha256(cfg.teacher), ann_sha256=dataset.ann_sha256,
        image_ids=dataset.image_ids, specs=specs, strides=teacher_cfg.strides,
        reg_max=teacher_cfg.reg_max, num_classes=teacher_cfg.num_classes, box_dtype=cfg.box_dtype,
        cls_dtype=cfg.cls_dtype, layout=layout, compressor=cfg.compressor, package_version=package_version(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        source={"teacher": cfg.teacher, "images": data.images, "ann": data.ann}, regions=regions,
        precision=compute_precision(device, cfg.amp),
    )
    opened = {}

    def open_on_main():
        opened["writer"] = _open_store(cfg, meta, layout, dataset, len(specs))

    run_on_main(open_on_main, dist_info)  # a refusal on rank 0 stops every rank
    # The other ranks join the store rank 0 opened (and cleaned): rank 0 may already be writing a shard.
    writer = opened.get("writer") or CacheWriter.resume(cfg.out, cfg.storage_options, clean=False)
    done = writer.shards_done()
    todo = [s for s in range(layout.num_shards) if not done[s] and s % dist_info.world_size == dist_info.rank]
    batches = shard_batches(layout, todo, cfg.batch_size)
    num_views = sum(len(b) for b in batches)

    space_of = {key: "region" if two and ARRAY_OF_KEY[key] in schema.REGION_ARRAYS else "rows" for key in ARRAY_OF_KEY}
    assembler = ShardAssembler(writer, layout, space_of)
    work: queue.Queue = queue.Queue(maxsize=4)
    errors: list = []
    thread = threading.Thread(target=_writer_loop, args=(work, assembler, layout, errors), daemon=True)
    thread.start()
    keys = view_keys(layout, batches)
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
                encoded = {}
                if two:  # every location: what BCKD reads
                    encoded["edges"] = encode_edges(box_rows, teacher_cfg.reg_max)
                    encoded.update({f"cls.{k}": t for k, t in encode_topk(cls_rows, topk).items()})
                if sparse:  # keep only the rows the LD losses read
                    picks = [region_rows[layout.image_index[v]][layout.spec_index[v]] for v in views]
                    n = layout.records[views[0]].num_rows  # equal canvases: equal dense rows
                    take = torch.cat([p.long() + i * n for i, p in enumerate(picks)]).to(box_rows.device)
                    box_rows, cls_rows = box_rows[take], cls_rows[take]
                encoded.update(
                    {f"box.{k}": t for k, t in encode_rows(box_rows, cfg.box_dtype, teacher_cfg.reg_max).items()}
                )
                if cfg.cls_dtype is not None and not two:
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
        raise _write_error(errors[0], cfg.out)
    seconds = time.perf_counter() - start
    barrier()  # every rank's shards are stored
    if dist_info.is_main and not writer.meta.complete and writer.shards_done().all():
        try:  # (a complete cache is not written again: it may be read-only)
            writer.finalize()
        except OSError as err:
            raise _write_error(err, cfg.out) from None
    barrier()
    return {"views": num_views, "seconds": seconds, "shards_written": len(todo), "num_shards": layout.num_shards,
            "complete": writer.meta.complete, "bytes_written": assembler.bytes_written,
            "already_complete": not todo and writer.meta.complete}


def _write_error(err: BaseException, out: str) -> BaseException:
    """A failed store write (read-only location, disk full, ...) as the user's error to fix."""
    if isinstance(err, OSError):
        return UserError(f"cannot write {out} ({err.strerror or err}); make it writable or free space, then run the "
                         "same command again to resume (the shards already written are kept)")
    return err


def format_dump_result(result: dict, out: str) -> str:
    """One line for the user about a finished run_dump."""
    if result["already_complete"]:
        return f"{out} is already complete; nothing to do"
    share = " (rank 0's share)" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    return (f"wrote {result['views']:,} views{share} ({result['bytes_written'] / 2**20:,.1f} MiB of rows) in "
            f"{result['seconds']:.1f} s ({result['views'] / max(result['seconds'], 1e-9):.1f} views/s); "
            f"{'complete' if result['complete'] else 'incomplete'}: {out}")


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host

