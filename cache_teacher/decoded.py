"""A cache's rows decoded to float32 logits: DecodedRows (what TeacherCache.decode returns for a
view or a batch) and CachedView (one view, spread over all its locations on demand)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from cache_teacher.codec import logits_of_edges
from data.views import ViewRecord


class DecodedRows(NamedTuple):
    """A view's (or a batch's) teacher rows as float32 logits. In an ld+bckd cache (edges given)
    cls and edges cover every location and box only the rows `location` names."""

    box: torch.Tensor | None  # [n, 4(reg_max+1)]; None when not asked for
    cls: torch.Tensor | None  # [n, C]; None without class logits (a --no-cls cache, or not asked for)
    location: torch.Tensor | None  # region-sparse caches: each box row's index among the dense rows
    edges: torch.Tensor | None = None  # ld+bckd: [n_dense, 4] the expected edge distances (stride units)


@dataclass
class CachedView:
    record: ViewRecord
    box: torch.Tensor  # [n, 4(reg_max+1)] float32 logits
    cls: torch.Tensor | None  # [n, C] float32 logits (None for --no-cls caches)
    location: torch.Tensor | None = None  # region-sparse caches: each box row's index among the dense rows
    edges: torch.Tensor | None = None  # ld+bckd caches: [num_rows, 4] (cls covers every location too)

    def dense(self) -> "CachedView":
        """A sparse view spread over all its locations: where nothing is stored, box logits 0 (flat
        distributions; in an ld+bckd cache, logits whose expectation is the stored edges) and class
        logits -1e4 (probability 0). Dense views are returned as they are."""
        if self.location is None:
            return self
        n, loc = self.record.num_rows, self.location.long()
        if self.edges is not None:  # ld+bckd: each location's expected edges as logits, stored rows as they are
            box = logits_of_edges(self.edges, self.box.shape[1] // 4 - 1).index_copy(0, loc, self.box)
        else:
            box = self.box.new_zeros((n, self.box.shape[1])).index_copy(0, loc, self.box)
        cls = self.cls
        if cls is not None and self.edges is None:  # main+vlr: class logits at the stored rows only
            cls = self.cls.new_full((n, self.cls.shape[1]), -1e4).index_copy(0, loc, self.cls)
        return CachedView(self.record, box, cls, None, self.edges)
