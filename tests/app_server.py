"""Start ``p2pz app --demo`` in a subprocess on 127.0.0.1 and a free port, for the app tests.

The demo folder gets, before the app starts, two concepts of another text encoder (CLIP ViT-L/14,
D=768: ``other:horse`` and ``other:zebra``), so ``horse->zebra`` exists only for an encoder the
tiny model does not have: the encoder-mismatch case.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT_S = 240
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy for 127.0.0.1


@dataclass
class AppServer:
    url: str
    demo_dir: Path
    proc: subprocess.Popen
    log: Path

    @property
    def registry(self) -> Path:
        return self.demo_dir / "registry"

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text("utf-8", errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_other_encoder_concepts(registry: Path) -> None:
    """``other:horse`` and ``other:zebra`` for CLIP ViT-L/14 (random embeddings of its shape)."""
    import torch

    from p2pz_directions.core.store import LocalStore
    from p2pz_directions.editing.models import CLIP_L

    g = torch.Generator().manual_seed(0)
    concepts = []
    from p2pz_directions.core.concept import Concept

    for name in ("horse", "zebra"):
        emb = torch.randn(77, 768, generator=g)
        concepts.append(Concept(name=name, embedding=emb, encoder=CLIP_L, captions=[f"a photo of a {name}"]))
    LocalStore(registry).publish_many(concepts, pack="other")


def start_app(demo_dir: Path, *, extra_args: tuple[str, ...] = ()) -> AppServer:
    """Run the demo app; return once it answers HTTP (or fail with its log)."""
    demo_dir = Path(demo_dir)
    demo_dir.mkdir(parents=True, exist_ok=True)
    add_other_encoder_concepts(demo_dir / "registry")
    port = free_port()
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        P2PZ_HOME=str(demo_dir / "registry"),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    log = demo_dir / "app.log"
    fh = open(log, "wb")  # noqa: SIM115 - closed with the process
    cmd = [sys.executable, "-m", "p2pz_directions.cli", "app", "--demo", "--demo-dir", str(demo_dir)]
    cmd += ["--port", str(port), "--steps", "2", *extra_args]
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    server = AppServer(f"http://127.0.0.1:{port}/", demo_dir, proc, log)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            with _OPENER.open(server.url, timeout=5) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(1.0)
    server.stop()
    raise RuntimeError(f"the app did not answer within {READY_TIMEOUT_S} s:\n{server.log_tail()}")
