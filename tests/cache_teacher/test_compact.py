"""ld+bckd caches: box logits at the Main and VLR rows, and at every location the expected edges
and the top-k class logits with a floor. Their decoded targets equal a dense cache's within the
storage's own error, LD's losses are the dense cache's bit for bit, BCKD's within that error."""

import pytest
import torch

from cache_teacher.codec import decode_topk, encode_topk
from cache_teacher.inspect import summarize
from cache_teacher.reader import CacheReader
from detector.distributions import integral, logits_of_edges
from distill.config import LossConfig
from tests.cache_teacher.test_sparse import cache_losses, dump_at_160
from tests.cli_runner import assert_user_error, run_cli
from tests.conftest import TINY_MODEL_FLAGS

FP16_EDGE = 16 * 2**-11  # fp16 spacing below 16 bins: an edge's rounding is at most half of it


@pytest.fixture(scope="module")
def caches(tiny_coco, tiny_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("compact")
    dense = dump_at_160(tiny_coco, tiny_teacher["path"], root / "dense.zarr")
    compact = dump_at_160(tiny_coco, tiny_teacher["path"], root / "compact.zarr", store_regions="ld+bckd",
                    min_vlr_gamma=0.25, cls_topk=2)
    return dense, compact


def test_topk_codec_keeps_the_largest_classes_and_the_mass_of_the_rest():
    torch.manual_seed(0)
    logits = torch.randn(50, 9) * 4
    stored = encode_topk(logits, 3)
    back = decode_topk(stored["topk"], stored["index"], stored["floor"], 9)
    top = logits.topk(3, dim=1)
    assert torch.equal(stored["index"].long(), top.indices)
    assert torch.equal(back.gather(1, top.indices), top.values.half().float())  # the top 3: fp16 of the logit
    p, q = logits.sigmoid(), back.sigmoid()
    rest = torch.ones_like(p, dtype=torch.bool).scatter_(1, top.indices, False)
    # The others share one probability: their mean (to fp16 rounding of its logit) ...
    mean_rest = (p * rest).sum(1) / 6
    assert torch.allclose(q[rest].reshape(50, 6)[:, 0], mean_rest, atol=2e-3)
    # ... so each is off by at most the spread of the rest, which the k-th largest bounds.
    err = ((p - q).abs() * rest).amax(1)
    assert (err <= top.values[:, -1].sigmoid() + 1e-3).all()


def test_edges_as_logits_decode_to_the_same_edges():
    edges = torch.tensor([[0.0, 3.25, 15.99, 7.5], [12.0, 0.01, 1.0, 15.5]])
    assert torch.allclose(integral(logits_of_edges(edges, 16), 16), edges, atol=1e-4)


def test_compact_cache_is_smaller_and_describes_itself(caches):
    dense, compact = caches
    d, c = summarize(dense), summarize(compact)
    assert c["format_version"] == 3 and c["regions"]["kind"] == "ld+bckd" and c["regions"]["cls_topk"] == 2
    assert c["rows"] == d["rows"] and c["regions"]["rows_stored"] < d["rows"]
    assert c["bytes_on_disk_total"] < 0.75 * d["bytes_on_disk_total"]
    assert set(c["bytes_on_disk"]) == {"box", "location", "edges", "cls_topk", "cls_index", "cls_floor"}


def test_compact_targets_equal_the_dense_caches_within_its_storage_error(caches):
    dense, compact = caches
    for v in range(len(dense.records)):
        a, b = dense.read_view(v), compact.read_view(v)
        assert a.record == b.record
        assert torch.allclose(b.box, a.box[b.location], atol=2e-3)  # the same fp16 rows (a different batching)
        assert (integral(a.box, 16) - b.edges).abs().max() <= FP16_EDGE / 2 + 2e-3
        # the two largest class logits as stored (a random teacher ties often: compare values, not classes)
        assert torch.allclose(b.cls.topk(2, dim=1).values, a.cls.topk(2, dim=1).values, atol=2e-3)
        # every other class: within the (k+1)-th largest probability of the dense row
        third = a.cls.topk(3, dim=1).values[:, 2].sigmoid()
        assert ((a.cls.sigmoid() - b.cls.sigmoid()).abs().amax(1) <= third + 2e-3).all()
        # pictures and AP decode the edges (the stored rows: their own box logits)
        assert (integral(b.dense().box, 16) - b.edges).abs().max() <= FP16_EDGE / 2 + 2e-3


def test_ld_losses_are_the_dense_caches_and_bckd_within_its_error(tiny_coco, tiny_teacher, caches, tmp_path):
    dense, compact = caches
    exact = dump_at_160(tiny_coco, tiny_teacher["path"], tmp_path / "exact.zarr", store_regions="ld+bckd", cls_topk=5)
    keys = [(0, 0), (3, 1), (5, 0), (7, 1)]
    ld = LossConfig(kd_weight=0.0)  # the box logits at Main and VLR rows are stored as in a dense cache
    a, b = cache_losses(tiny_coco, dense, ld, keys), cache_losses(tiny_coco, compact, ld, keys)
    for key in ("loss_ld", "loss_ld_vlr"):
        assert float(a[key].detach()) != 0 and float(b[key].detach()) == pytest.approx(
            float(a[key].detach()), rel=1e-3
        ), key
    bckd = LossConfig(recipe="bckd")
    a, b = cache_losses(tiny_coco, dense, bckd, keys), cache_losses(tiny_coco, compact, bckd, keys)
    # Top 2 of a random teacher's 5 near-uniform classes: the floor moves BCKD's class targets and,
    # through them, its box weights, by a few percent ...
    for key in ("loss_bckd_cls", "loss_bckd_box"):
        assert float(b[key].detach()) == pytest.approx(float(a[key].detach()), rel=0.15), key
    # ... and with every class stored only the edges' fp16 rounding is left.
    c = cache_losses(tiny_coco, exact, bckd, keys)
    for key in ("loss_bckd_cls", "loss_bckd_box"):
        assert float(c[key].detach()) == pytest.approx(float(a[key].detach()), rel=2e-3), key


def test_bad_dumps_and_runs_are_refused_in_one_line(tiny_coco, tiny_teacher, caches, tmp_path):
    dense, compact = caches
    args = ["train-student", "--images", tiny_coco["images"], "--ann", tiny_coco["ann"], "--out", tmp_path / "run",
            "--workers", "0", *TINY_MODEL_FLAGS, "--max-iters", "1"]
    sparse = dump_at_160(tiny_coco, tiny_teacher["path"], tmp_path / "sparse.zarr", store_regions="main+vlr")
    assert_user_error(run_cli(*args, "--cache", sparse.location, "--recipe", "bckd"), "BCKD reads every location",
                      "--store-regions ld+bckd")
    assert_user_error(run_cli(*args, "--cache", compact.location, "--vlr-gamma", "0.1"), "gamma >= 0.25")
    no_cls = dump_at_160(tiny_coco, tiny_teacher["path"], tmp_path / "no-cls.zarr", cls=False)
    assert_user_error(run_cli(*args, "--cache", no_cls.location, "--recipe", "bckd"), "holds no class logits",
                      "BCKD needs them")
    assert_user_error(run_cli(*args, "--cache", dense.location, "--recipe", "bckd", "--bckd-cls-weight", "-1"),
                      "--bckd-cls-weight must be a number in [0, 10000]")
    assert not (tmp_path / "run").exists()
    proc = run_cli("dump-teacher", "--teacher", tiny_teacher["path"], "--images", tiny_coco["images"], "--ann",
                   tiny_coco["ann"], "--store-regions", "ld+bckd", "--no-cls", "--out", tmp_path / "c.zarr")
    assert_user_error(proc, "ld+bckd stores the class logits")
    assert not (tmp_path / "c.zarr").exists()


def test_verify_reports_the_compact_caches_fidelity(caches, tiny_teacher):
    from cache_teacher.verify import verify

    _, compact = caches
    r = verify(CacheReader(compact.location), str(tiny_teacher["path"]), None, None, num_views=3, device="cpu",
               ap_images=0)
    f = r["fidelity"]
    assert r["ok"] and f["edges_max_abs_err"] <= FP16_EDGE and f["kl_t10_mean"] < 1e-5
    assert f["cls_max_abs_err"] is None and 0 < f["cls_max_prob_err"] < 0.5


def test_the_floor_is_the_logit_of_the_rests_mean_probability_at_any_logit():
    """Confident background (every logit far below 0) and the opposite: the floor is still the logit
    of the left-out classes' mean probability, so it stays at or below the k-th largest logit."""
    logits = torch.tensor([[-16.0, -17.0, -18.0, -19.0, -20.0, -21.0],
                           [-30.0, -25.0, -40.0, -22.0, -35.0, -28.0],
                           [-6.0, -8.0, -10.0, -12.0, -14.0, -16.0],
                           [15.0, 15.0, 15.0, 15.0, 14.5, 14.0]])
    stored = encode_topk(logits, 2)
    top = logits.topk(2, dim=1)
    rest = torch.ones_like(logits, dtype=torch.bool).scatter_(1, top.indices, False)
    p = logits.double().sigmoid()
    # logit(mean p) = log(sum p) - log(sum (1 - p)) over the rest, in float64 from log-probabilities
    log_p = torch.nn.functional.logsigmoid(logits.double()).masked_fill(~rest, -float("inf"))
    log_q = torch.nn.functional.logsigmoid(-logits.double()).masked_fill(~rest, -float("inf"))
    expected = torch.logsumexp(log_p, 1) - torch.logsumexp(log_q, 1)
    assert torch.allclose(stored["floor"].double(), expected, atol=2e-2)  # fp16 spacing at |logit| < 32
    assert (stored["floor"].float() <= top.values[:, -1]).all()
    back = decode_topk(stored["topk"], stored["index"], stored["floor"], 6).double()
    mean_rest = (p * rest).sum(1) / rest.sum(1)
    assert torch.allclose(back.sigmoid()[rest].reshape(4, 4)[:, 0] / mean_rest, torch.ones(4, dtype=torch.float64),
                          atol=2e-2)  # the mass of the rest, relative: kept at every scale
