"""Stands in for `ldcache train-student` in sweep tests: records the environment and device the
sweep gave it, and writes the eval.json of a finished point."""

import json
import os
import sys
import time
from pathlib import Path

args = sys.argv[1:]
out = Path(args[args.index("--out") + 1])
rank = int(os.environ.get("RANK", "0"))
record = {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "threads": os.environ.get("OMP_NUM_THREADS"),
          "device": args[args.index("--device") + 1] if "--device" in args else None,
          "world_size": int(os.environ.get("WORLD_SIZE", "1")), "start": time.time()}
time.sleep(0.3)  # long enough for the points of one round to overlap
record["end"] = time.time()
(out / f"env-{rank}.json").write_text(json.dumps(record))
if rank == 0:
    (out / "eval.json").write_text(
        json.dumps({"metrics": {"AP": 0.1, "AP50": 0.2, "AP75": 0.05}, "train_seconds": 0.3})
    )
