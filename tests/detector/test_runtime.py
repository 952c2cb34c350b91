import io
import sys

from core import runtime


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def _frames(monkeypatch, tty: bool, **kwargs) -> int:
    stream = _Stream(tty)
    monkeypatch.setattr(sys, "stderr", stream)
    for _ in runtime.progress_bar(range(2000), desc="t", **kwargs):
        pass
    return stream.getvalue().count("\r")


def test_progress_bar_into_a_log_writes_few_frames(monkeypatch):
    # a terminal redraws as often as asked; a file or pipe gets the first and the last frame only
    # when the loop is faster than LOG_INTERVAL_S
    assert _frames(monkeypatch, tty=True, mininterval=0) > 100
    assert _frames(monkeypatch, tty=False) <= 3


def test_progress_bar_keeps_a_caller_interval(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Stream(False))
    assert runtime.progress_bar(total=1, mininterval=5).mininterval == 5
    assert runtime.progress_bar(total=1).mininterval == runtime.LOG_INTERVAL_S


def test_a_transient_bar_leaves_no_blank_line_in_a_log(monkeypatch):
    stream = _Stream(False)
    monkeypatch.setattr(sys, "stderr", stream)
    for _ in runtime.progress_bar(range(3), desc="evaluating", leave=False):
        pass
    frames = [f for f in stream.getvalue().replace("\n", "\r").split("\r") if f]
    assert frames and all(f.strip() for f in frames), frames  # no frame of only spaces
    assert "evaluating" in frames[-1] and "3/3" in frames[-1]  # the finished bar stays


def test_a_cuda_rank_computes_on_its_own_gpu(monkeypatch):
    """The placement rule every command uses for its networks, the student's and an online
    teacher's alike (distill.engine puts the teacher where the student is): under torchrun a CUDA
    process takes cuda:LOCAL_RANK, whatever index was asked for; an index the machine lacks is a
    one-line error, not a CUDA crash later."""
    import pytest
    import torch

    from core.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert runtime.resolve_device("cuda", local_rank=2) == torch.device("cuda", 2)
    assert runtime.resolve_device("auto", local_rank=3) == torch.device("cuda", 3)
    assert runtime.resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 1)
    assert runtime.resolve_device("cuda:3") == torch.device("cuda", 3)  # one process: the GPU asked for
    assert runtime.resolve_device("cpu", local_rank=2) == torch.device("cpu")  # gloo ranks share the CPU
    with pytest.raises(UserError, match="has 4 GPU"):
        runtime.resolve_device("cuda:4")
    with pytest.raises(UserError, match="has 4 GPU"):
        runtime.resolve_device("cuda", local_rank=5)
