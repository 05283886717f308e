"""`UNetRunner`: one object that runs a sampler's per-step UNet work eagerly, replayed from CUDA
graphs, or through ``torch.compile`` - the same loop either way.

A UNet pass in eager PyTorch is bound by the CPU launching ~1000 kernels (~30 ms on an H100 for a
few ms of GPU work); a CUDA graph launches them all at once. A sampler hands the runner a *step
function* over tensors, ``fn(*inputs) -> tensor or tuple of tensors``, under a name and a ``key``
(the Python values ``fn`` closes over: guidance scale, step sizes, ...):

- ``mode="eager"``: ``fn(*inputs)``;
- ``mode="graphs"`` (CUDA): the first call of a (name, key, input shapes) copies the inputs into
  static tensors, warms ``fn`` up on a side stream, captures it as a ``torch.cuda.CUDAGraph`` and
  keeps it; every call copies its inputs in and replays the graph. The captured ``fn`` is the one
  given first: what it closes over must not change while the key stays the same;
- ``mode="compile"``: ``torch.compile(fn)`` kept per (name, key); on CUDA the compiled ``fn`` is
  then captured as a CUDA graph exactly as in ``"graphs"`` (inductor's fused kernels, launched all
  at once), on the CPU it is called as it is. Compiled kernels go to a persistent cache under the
  p2pz cache dir (`compile_cache_dir`), so only the first run on a machine pays for the compilation.

Outputs are copied out of the static tensors, so callers may keep them across steps. The runner
owns its graphs (`graphs`, `clear`) and the objects they are bound to (`resource`), so nothing is
hidden on the UNet or the editor.

>>> runner = UNetRunner("eager")
>>> double = runner("double", lambda x: 2 * x, torch.ones(2))
>>> double.tolist()
[2.0, 2.0]
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from p2pz_directions.core import constants, cuda_start

__all__ = ["RUNNER_MODES", "UNetRunner", "compile_cache_dir", "compiled"]

RUNNER_MODES = ("eager", "graphs", "compile")


def compile_cache_dir() -> Path:
    """Where `torch.compile`'s kernels persist between processes: ``$TORCHINDUCTOR_CACHE_DIR`` when the
    user set it, else ``<p2pz home>/torch-compile`` (``$P2PZ_HOME``, default ``~/.cache/p2pz``; see
    docs/configuration.md). Inductor's FX-graph and Triton caches live below it, so a second process
    compiling the same step loads the kernels instead of generating them."""
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return Path(env) if env else constants.home() / "torch-compile"


def compiled(fn: Callable[..., Any], **compile_kwargs: Any) -> Callable[..., Any]:
    """``torch.compile(fn, **compile_kwargs)`` with its kernels in the persistent `compile_cache_dir`."""
    folder = compile_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"no write permission on {folder}")
    except OSError as e:
        raise OSError(
            f"torch.compile's kernel cache {folder} cannot be written ({e.strerror or e}); set P2PZ_HOME "
            f"(or TORCHINDUCTOR_CACHE_DIR) to a writable folder, or use loops='graphs'"
        ) from e
    # read by inductor when it compiles (not at import), so setting it here is enough
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return torch.compile(fn, **compile_kwargs)


def _signature(inputs: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((tuple(x.shape), x.dtype, x.device) for x in inputs)


def _on_cuda(inputs: tuple[torch.Tensor, ...]) -> bool:
    return bool(inputs) and all(x.is_cuda for x in inputs)


def _copy_out(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_copy_out(o) for o in out)
    return out


@dataclass
class _Graph:
    graph: Any
    inputs: tuple[torch.Tensor, ...]
    output: Any


@dataclass
class UNetRunner:
    """Runs step functions eagerly, as CUDA graphs or compiled (see the module docstring).

    ``warmup``: eager runs before a capture (cuDNN / cuBLAS plans, lazy allocations such as
    attention-map buffers happen there, never inside the capture).
    """

    mode: str = "eager"
    warmup: int = 1
    compile_kwargs: dict[str, Any] = field(default_factory=dict)
    _graphs: dict[Hashable, _Graph | None] = field(default_factory=dict, repr=False)
    _compiled: dict[Hashable, Callable[..., Any]] = field(default_factory=dict, repr=False)
    _resources: dict[Hashable, Any] = field(default_factory=dict, repr=False)
    _pool: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in RUNNER_MODES:
            raise ValueError(f"runner mode must be one of {', '.join(RUNNER_MODES)}, not {self.mode!r}")

    @property
    def graphs(self) -> dict[Hashable, Any]:
        """The captured graphs by (name, key, input signature); None where capture failed (eager)."""
        return dict(self._graphs)

    def clear(self) -> None:
        """Free every graph, compiled function and resource (their memory goes back to PyTorch)."""
        self._graphs.clear()
        self._compiled.clear()
        self._resources.clear()
        self._pool = None

    def resource(self, key: Hashable, factory: Callable[[], Any]) -> Any:
        """An object kept with the graphs (e.g. attention-map buffers a graph writes into),
        made by ``factory()`` on first use and freed by `clear`."""
        if key not in self._resources:
            self._resources[key] = factory()
        return self._resources[key]

    def __call__(self, name: str, fn: Callable[..., Any], *inputs: torch.Tensor, key: Hashable = ()) -> Any:
        """``fn(*inputs)``, run as this runner's mode says."""
        if self.mode == "eager":
            return fn(*inputs)
        if self.mode == "compile":
            ck, cuda = (name, key), _on_cuda(inputs)
            if ck not in self._compiled:
                kwargs = {"dynamic": False, **self.compile_kwargs} if cuda else self.compile_kwargs
                self._compiled[ck] = compiled(fn, **kwargs)
            fn = self._compiled[ck]
            if not cuda:
                return fn(*inputs)
        gk = (name, key, _signature(inputs))
        if gk not in self._graphs:
            self._graphs[gk] = self._capture(fn, inputs)
        entry = self._graphs[gk]
        if entry is None:  # capture failed once: eager for this key
            return fn(*inputs)
        for static, x in zip(entry.inputs, inputs, strict=True):
            if static.data_ptr() != x.data_ptr():
                static.copy_(x)
        entry.graph.replay()
        return _copy_out(entry.output)

    def _capture(self, fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...]) -> _Graph | None:
        if not all(x.is_cuda for x in inputs):
            raise ValueError("runner mode 'graphs' needs CUDA tensors; use mode 'eager' on the CPU")
        cuda_start.wait()  # the CLI's start-up thread must not run GPU work during a capture
        static = tuple(x.detach().clone() for x in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # a compiled fn compiles in its first warm-up run; the second settles inductor's lazy work
        warmup = max(self.warmup, 2) if self.mode == "compile" else self.warmup
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                out = fn(*static)
        except RuntimeError as e:  # an op that syncs with the host, say: run this step eagerly
            warnings.warn(f"CUDA graph capture failed ({e}); running this step eagerly", stacklevel=4)
            return None
        return _Graph(graph, static, out)
