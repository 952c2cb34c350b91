"""A cache's rows decoded to float32 logits: DecodedRows (what CacheReader.decode returns for a
view or a batch) and DecodedView (one view, spread over all its locations on demand).

A location a region-sparse cache did not store is NaN in every dense array read back from it
(spread): one convention for all readers. A loss refuses to read NaN (distill.criterion: the rows
it reads must exist); a picture or the teacher's AP, which look at every location, take NaN as no
detection (without_holes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from data.views import ViewRecord
from detector.distributions import logits_of_edges


class DecodedRows(NamedTuple):
    """A view's (or a batch's) teacher rows as float32 logits. In an ld+bckd cache (edges given)
    cls and edges cover every location and box only the rows `location` names."""

    box: torch.Tensor | None  # [n, 4(reg_max+1)]; None when not asked for
    cls: torch.Tensor | None  # [n, C]; None without class logits (a --no-cls cache, or not asked for)
    location: torch.Tensor | None  # region-sparse caches: each box row's index among the dense rows
    edges: torch.Tensor | None = None  # ld+bckd: [n_dense, 4] the expected edge distances (stride units)


def spread(rows: torch.Tensor, location: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Stored rows [m, K] at their locations among num_rows dense rows, NaN elsewhere: [num_rows, K]."""
    return rows.new_full((num_rows, rows.shape[1]), float("nan")).index_copy(0, location.long(), rows)


@dataclass
class DecodedView:
    record: ViewRecord
    box: torch.Tensor  # [n, 4(reg_max+1)] float32 logits
    cls: torch.Tensor | None  # [n, C] float32 logits (None for --no-cls caches)
    location: torch.Tensor | None = None  # region-sparse caches: each box row's index among the dense rows
    edges: torch.Tensor | None = None  # ld+bckd caches: [num_rows, 4] (cls covers every location too)

    def dense(self) -> DecodedView:
        """A sparse view spread over all its locations, NaN where nothing is stored (spread); an
        ld+bckd cache's every location has box logits whose expectation is its stored edges. Dense
        views are returned as they are."""
        if self.location is None:
            return self
        n, loc = self.record.num_rows, self.location.long()
        if self.edges is not None:  # ld+bckd: each location's expected edges as logits, stored rows as they are
            box = logits_of_edges(self.edges, self.box.shape[1] // 4 - 1).index_copy(0, loc, self.box)
        else:
            box = spread(self.box, loc, n)
        cls = self.cls
        if cls is not None and self.edges is None:  # main+vlr: class logits at the stored rows only
            cls = spread(self.cls, loc, n)
        return DecodedView(self.record, box, cls, None, self.edges)

    def without_holes(self) -> DecodedView:
        """The dense view with its NaN locations as no detection (class logits -1e4: probability 0;
        box logits 0: a flat distribution), for what looks at every location (pictures, AP)."""
        view = self.dense()
        cls = None if view.cls is None else view.cls.nan_to_num(nan=-1e4)
        return DecodedView(view.record, view.box.nan_to_num(nan=0.0), cls, None, view.edges)
