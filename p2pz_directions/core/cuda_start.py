"""Start the GPU while torch is still importing.

A one-off ``p2pz edit`` on CUDA waits ~0.4 s for the CUDA context and ~0.4 s more for the first
cuBLAS, cuDNN and fused-attention calls (loading those libraries and their kernels), all before
its first real step, and all after ``import torch`` (~1.9 s on an H200 machine); see
benchmarks/RESULTS.md. `start` moves that work into a background thread, begun before torch is
imported:

1. the CUDA context, through the driver API with ctypes (the GIL is released in the call, so it
   runs while the main thread imports torch; torch later finds the primary context made);
2. once torch is imported, one tiny float16 matmul, convolution, group norm and attention on a
   stream of the thread's own, which loads the libraries and kernels an edit needs.

`wait` joins the thread; `UNetRunner` calls it before every CUDA-graph capture (a capture must not
overlap other GPU work of the process). Nothing depends on the thread: a failure ends it quietly,
and torch does the same work when the edit first needs it. ``P2PZ_CUDA_PREWARM=0`` turns it off
(docs/configuration.md). This module imports nothing heavy.
"""

from __future__ import annotations

import ctypes
import sys
import threading

from p2pz_directions.core import constants

__all__ = ["start", "started", "wait"]

_thread: threading.Thread | None = None
_lock = threading.Lock()


def start(device: str | None) -> bool:
    """Begin starting CUDA device ``device`` (``None``: the default, cuda:0 when there is a GPU) in a
    background thread; once per process. False when it is off, or ``device`` is not CUDA."""
    global _thread
    if not constants.cuda_prewarm():
        return False
    index = _cuda_index(device)
    if index is None:
        return False
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_run, args=(index,), name="p2pz-cuda-start", daemon=True)
            _thread.start()
    return True


def started() -> bool:
    """Whether `start` began a thread in this process."""
    return _thread is not None


def wait(timeout: float | None = None) -> None:
    """Return once the start-up thread (if any) is done."""
    t = _thread
    if t is not None and t is not threading.current_thread():
        t.join(timeout)


def _cuda_index(device: str | None) -> int | None:
    if device is None:
        return 0
    d = device.strip().lower()
    if d == "cuda":
        return 0
    if d.startswith("cuda:") and d[5:].isdigit():
        return int(d[5:])
    return None


def _run(index: int) -> None:
    try:
        if not _driver_context(index):
            return
        _first_kernels(index)
    except Exception:  # noqa: BLE001 - a head start only: torch does all of it again when needed
        return


def _driver_context(index: int) -> bool:
    """``cuInit`` + the primary context of device ``index``, which the CUDA runtime (torch) uses."""
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:  # no NVIDIA driver: nothing to start
        return False
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    return (
        lib.cuInit(0) == 0
        and lib.cuDeviceGet(ctypes.byref(dev), index) == 0
        and lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0
    )


def _first_kernels(index: int) -> None:
    import torch  # blocks until the main thread's import of torch is done
    import torch.nn.functional as F

    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        return
    dev = torch.device("cuda", index)
    with torch.cuda.device(dev):
        stream = torch.cuda.Stream(dev)
        with torch.cuda.stream(stream), torch.no_grad():
            h = torch.float16
            a = torch.randn(64, 64, device=dev, dtype=h)
            F.linear(a, a, a[0])
            x = torch.randn(1, 32, 16, 16, device=dev, dtype=h)
            F.group_norm(F.conv2d(x, torch.randn(32, 32, 3, 3, device=dev, dtype=h), padding=1), 8)
            q = torch.randn(1, 2, 64, 40, device=dev, dtype=h)
            F.scaled_dot_product_attention(q, q, q)
            F.layer_norm(a, (64,))
        stream.synchronize()
