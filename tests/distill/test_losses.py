"""The distillation KL on rows of logits (softmax over bins or classes, and the per-class sigmoid)."""

import pytest
import torch

from distill.losses import distill_kl, sigmoid_kl


@pytest.mark.parametrize("key", ["T10_K17", "T2_K5", "T1_K80"])
def test_distill_kl_matches_mmdet_kd_loss(mmdet_fixture, key):
    case = mmdet_fixture["kd"][key]
    ours = distill_kl(case["student"], case["teacher"], case["T"])
    torch.testing.assert_close(ours, case["loss"], rtol=1e-5, atol=1e-7)


def test_distill_kl_properties():
    s = torch.randn(10, 17, requires_grad=True)
    assert float(distill_kl(s, s.detach(), 10.0).detach().abs().max()) < 1e-6  # KL(p || p) = 0
    t = torch.randn(10, 17)
    distill_kl(s, t, 10.0).sum().backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0  # the student learns
    # One class: a softmax over one logit is always 1, so the softmax KD says nothing there...
    one_s, one_t = torch.randn(8, 1), torch.randn(8, 1) + 3
    assert float(distill_kl(one_s, one_t, 2.0).abs().max()) == 0.0
    # ...while the per-class sigmoid KL still compares the two probabilities.
    assert float(sigmoid_kl(one_s, one_t, 2.0).min()) > 0
    assert float(sigmoid_kl(one_t, one_t, 2.0).abs().max()) < 1e-6
