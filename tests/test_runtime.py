"""core.runtime: the autocast rule on a CPU."""

import torch

from core import runtime


def test_an_explicit_amp_on_cpu_is_noted_once_and_computes_in_fp32(capsys):
    runtime.note_amp_ignored.cache_clear()
    cpu = torch.device("cpu")
    for amp in ("auto", "off"):
        with runtime.autocast_for(cpu, amp):
            pass
    assert capsys.readouterr().err == ""
    for _ in range(3):
        with runtime.autocast_for(cpu, "bf16"):
            y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--amp bf16 applies on CUDA only" in err


def test_the_precision_a_cache_records_follows_device_and_amp():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    assert {runtime.compute_precision(cpu, amp) for amp in runtime.AMP_MODES} == {"fp32"}
    assert [runtime.compute_precision(cuda, amp) for amp in ("auto", "bf16", "fp16")] == ["bf16", "bf16", "fp16"]
    allowed = torch.backends.cudnn.allow_tf32
    try:
        for tf32, name in ((True, "tf32"), (False, "fp32")):
            torch.backends.cudnn.allow_tf32 = tf32
            assert runtime.compute_precision(cuda, "off") == name
    finally:
        torch.backends.cudnn.allow_tf32 = allowed
