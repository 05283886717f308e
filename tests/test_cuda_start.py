"""`core.cuda_start`: the CLI's head start on the GPU (CUDA context and first kernels in a thread)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from p2pz_directions.core import cuda_start
from p2pz_directions.core.constants import ConfigError


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(cuda_start, "_thread", None)
    monkeypatch.delenv("P2PZ_CUDA_PREWARM", raising=False)
    return cuda_start


@pytest.mark.parametrize(
    ("device", "index"),
    [(None, 0), ("cuda", 0), (" CUDA ", 0), ("cuda:3", 3), ("cpu", None), ("mps", None), ("cuda:x", None)],
)
def test_which_devices_are_started(device, index):
    assert cuda_start._cuda_index(device) == index


def test_off_for_the_cpu_and_when_turned_off(fresh, monkeypatch):
    ran = []
    monkeypatch.setattr(fresh, "_run", ran.append)
    assert fresh.start("cpu") is False and not fresh.started()
    monkeypatch.setenv("P2PZ_CUDA_PREWARM", "0")
    assert fresh.start("cuda") is False and not fresh.started()
    fresh.wait()  # nothing to wait for
    assert ran == []
    monkeypatch.setenv("P2PZ_CUDA_PREWARM", "maybe")
    with pytest.raises(ConfigError, match="P2PZ_CUDA_PREWARM='maybe'"):
        fresh.start("cuda")


def test_starts_once_and_wait_joins(fresh, monkeypatch):
    gate, ran = threading.Event(), []

    def run(index):
        gate.wait(5)
        ran.append(index)

    monkeypatch.setattr(fresh, "_run", run)
    assert fresh.start("cuda:1") is True
    assert fresh.start("cuda:0") is True  # already begun: no second thread
    assert ran == []
    gate.set()
    fresh.wait(5)
    assert ran == [1] and not fresh._thread.is_alive()


class _FakeDriver:
    def __init__(self, codes):
        self.codes, self.calls = codes, []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append(name)
            return self.codes.get(name, 0)

        return call


@pytest.mark.parametrize(
    ("codes", "ok", "calls"),
    [
        ({}, True, ["cuInit", "cuDeviceGet", "cuDevicePrimaryCtxRetain"]),
        ({"cuInit": 100}, False, ["cuInit"]),  # CUDA_ERROR_NO_DEVICE
        ({"cuDeviceGet": 101}, False, ["cuInit", "cuDeviceGet"]),  # CUDA_ERROR_INVALID_DEVICE
    ],
)
def test_driver_context_stops_at_the_first_error(monkeypatch, codes, ok, calls):
    fake = _FakeDriver(codes)
    monkeypatch.setattr(cuda_start.ctypes, "CDLL", lambda name: fake)
    assert cuda_start._driver_context(0) is ok
    assert fake.calls == calls


def test_no_driver_and_failures_end_the_thread_quietly(monkeypatch):
    def no_lib(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(cuda_start.ctypes, "CDLL", no_lib)
    assert cuda_start._driver_context(0) is False
    monkeypatch.setattr(cuda_start, "_driver_context", lambda i: True)

    def broken(index):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(cuda_start, "_first_kernels", broken)
    cuda_start._run(0)  # no exception escapes the thread


def test_the_cli_start_is_harmless_without_a_gpu(tmp_path):
    """In a fresh process with the default device: the thread starts, finds no GPU (or starts it),
    ends, and the process exits cleanly; with no driver it never imports torch itself."""
    code = (
        "import sys; from p2pz_directions.core import cuda_start\n"
        "assert cuda_start.start(None)\n"
        "cuda_start.wait(60)\n"
        "assert not cuda_start._thread.is_alive()\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert r.returncode == 0, r.stderr
    if not os.path.exists("/proc/driver/nvidia"):
        assert "TORCH False" in r.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_thread_leaves_torch_with_cuda_started():
    code = (
        "import sys, time; from p2pz_directions.core import cuda_start\n"
        "cuda_start.start('cuda')\n"
        "import torch\n"
        "cuda_start.wait(60)\n"
        "assert torch.cuda.is_initialized()\n"
        "x = torch.ones(4, device='cuda', dtype=torch.float16)\n"
        "g = torch.cuda.CUDAGraph()\n"
        "s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())\n"
        "with torch.cuda.stream(s): y = x * 2\n"
        "torch.cuda.current_stream().wait_stream(s)\n"
        "with torch.cuda.graph(g): y = x * 2\n"
        "g.replay(); torch.cuda.synchronize(); print('OK', y.tolist())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "OK [2.0, 2.0, 2.0, 2.0]" in r.stdout
