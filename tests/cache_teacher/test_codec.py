"""Encoding of logit rows for storage (fp32, fp16, uint8 with a per row-edge affine), and back."""

import numpy as np
import torch

from cache_teacher.codec import all_finite, decode_rows, encode_rows
from cache_teacher.fidelity import edge_kl


def test_fp16_and_fp32_round_trip():
    rows = torch.randn(50, 68) * 5
    assert torch.equal(decode_rows(encode_rows(rows, "float32")["data"].numpy()), rows)  # fp32 is exact
    fp16 = decode_rows(encode_rows(rows, "float16")["data"].numpy())
    assert torch.allclose(fp16, rows, rtol=2**-11, atol=0)  # fp16 keeps 11 significant bits


def test_uint8_error_is_bounded_by_half_a_step():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(500, 68, generator=gen) * torch.rand(500, 1, generator=gen) * 10
    rows[0] = 3.0  # a constant edge: zero span must not divide by zero
    enc = {k: v.numpy() for k, v in encode_rows(rows, "uint8", reg_max=16).items()}
    decoded = decode_rows(enc["data"], enc["lo"], enc["scale"])
    step = torch.from_numpy(enc["scale"].astype(np.float32)).repeat_interleave(17, dim=1)
    assert torch.all((decoded - rows).abs() <= step / 2 + 1e-6)  # the rounding error of one level at most
    assert torch.allclose(decoded[0], rows[0])
    # What it means for distillation: the KL at T=10 stays tiny.
    assert float(edge_kl(rows, decoded, 10.0).mean()) < 1e-4


def test_non_finite_rows_are_detected_in_every_encoding():
    rows = torch.randn(4, 68)
    rows[2, 5] = float("nan")
    rows[3, 0] = float("inf")
    for dtype in ("float16", "uint8", "float32"):
        enc = {k: v.numpy() for k, v in encode_rows(rows, dtype, reg_max=16).items()}
        assert all_finite(enc).tolist() == [True, True, False, False], dtype


def test_edge_kl_is_the_mean_over_bins_times_t_squared():
    s, t = torch.randn(3, 68), torch.randn(3, 68)
    p = torch.softmax(s.reshape(-1, 17) / 2, -1)
    q = torch.softmax(t.reshape(-1, 17) / 2, -1)
    expected = 4 * (p * (p.log() - q.log())).mean(-1)  # ld-spec section 4 with T = 2
    assert torch.allclose(edge_kl(s, t, 2.0).float(), expected, atol=1e-6)
    assert float(edge_kl(s, s, 10.0).abs().max()) < 1e-7  # KL of a distribution with itself
