"""`p2pz batch` as real processes: Ctrl-C and SIGKILL midway then resume; two accelerate processes = one."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from p2pz_directions.batch.results import STATE_DIR, read_journals
from p2pz_directions.cli import main
from p2pz_directions.core.concept import Concept
from p2pz_directions.core.store import LocalStore
from p2pz_directions.editing.models import encoder_for

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture
def model(tiny_sd1):
    enc = encoder_for(model=str(tiny_sd1))
    g = torch.Generator().manual_seed(0)
    store = LocalStore()
    for name in ("cat", "dog"):
        store.publish(Concept(name, torch.randn(77, enc.hidden_size, generator=g), enc))
    return tiny_sd1


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(4):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return e


def start(args: list) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "p2pz_directions.batch", *map(str, args)],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def lines_done(out: Path) -> int:
    return sum(
        p.read_text("utf-8").count("\n") for p in (out / STATE_DIR).glob("journal-*.jsonl") if p.is_file()
    )


def wait_for(out: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while lines_done(out) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "the batch made no progress"
        time.sleep(0.02)


def table(out: Path) -> list[dict]:
    return pq.read_table(out / "results.parquet").to_pylist()


def test_ctrl_c_then_kill_then_resume_without_redoing(model, photos, tmp_path, capsys):
    out = tmp_path / "edited"
    # 8 jobs, one at a time, with enough steps that a kill lands midway
    args = [photos, "-d", "cat->dog", "--seeds", "0,1", "-e", "sdedit", "-m", model, "--prompt", "a cat",
            "--steps", "8", "--strength", "1", "--batch-size", "1", "--device", "cpu", "--out", out, "-q"]  # fmt: skip

    proc = start(args)
    wait_for(out, 1, proc)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: stops after the job in flight, writes the table
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted: run the same command again to finish" in stdout
    first = table(out)
    assert 1 <= len(first) < 8 and not any(r["error"] for r in first)

    proc = start(args)
    wait_for(out, len(first) + 2, proc)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    before = read_journals(out)
    done = {k: r for k, r in before.items() if not r.get("error")}
    assert len(first) + 2 <= len(done) < 8, "the kill came too late to test a resume"
    # what a kill can leave: a half-written temp file, and (say) a damaged finished PNG
    (out / "images" / ".x.png.abc.tmp").write_bytes(b"\x89PNG half")
    damaged_id, damaged = next(iter(done.items()))
    (out / damaged["file_name"]).write_bytes(b"\x89PNG cut")
    stats = {k: (out / r["file_name"]).stat().st_mtime_ns for k, r in done.items() if k != damaged_id}

    code = main(["batch", *map(str, args)])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert f"8 jobs: {8 - len(done) + 1} edited now, {len(done) - 1} already done, 0 failed" in cap.out
    rows = {r["job_id"]: r for r in table(out)}
    assert len(rows) == 8 and not any(r["error"] for r in rows.values())
    for k, mtime in stats.items():  # finished jobs were not redone
        assert (
            rows[k]["run_id"] == done[k]["run_id"]
            and (out / rows[k]["file_name"]).stat().st_mtime_ns == mtime
        )
    assert rows[damaged_id]["run_id"] != damaged["run_id"]  # the damaged one was
    for r in rows.values():
        assert hashlib.sha256((out / r["file_name"]).read_bytes()).hexdigest() == r["sha256"]
    assert not list((out / "images").glob(".*.tmp"))
    assert len(list((out / "images").glob("*.png"))) == 8


def test_two_accelerate_processes_equal_one(model, photos, tmp_path, capsys):
    common = [photos, "-d", "cat->dog", "--seeds", "0,1", "-e", "sdedit", "-m", model, "--prompt", "a cat",
              "--steps", "2", "--batch-size", "2", "--device", "cpu", "-q"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["batch", *map(str, common), "--out", str(one)]) == 0, capsys.readouterr().err
    # --gpus 2 --device cpu: `accelerate launch --multi_gpu --num_processes 2 -m p2pz_directions.batch ...`
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "p2pz_directions.cli",
            "batch",
            *map(str, common),
            "--out",
            two,
            "--gpus",
            "2",
        ],
        env=env(),
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 jobs: 8 edited now" in proc.stdout
    t1, t2 = table(one), table(two)
    assert sorted(r["process"] for r in t2) == [0, 0, 0, 0, 1, 1, 1, 1]  # both processes worked
    keep = ("job_id", "input", "direction", "direction_name", "concept_hashes", "options", "seed", "file_name", "sha256", "error")  # fmt: skip
    assert sorted([{k: r[k] for k in keep} for r in t1], key=lambda r: r["job_id"]) == sorted(
        [{k: r[k] for k in keep} for r in t2], key=lambda r: r["job_id"]
    )
    for r in t1:
        assert (one / r["file_name"]).read_bytes() == (two / r["file_name"]).read_bytes()
    assert (one / "metadata.jsonl").read_text("utf-8").count("\n") == 8
    assert sorted((two / "metadata.jsonl").read_text("utf-8").splitlines()) == sorted(
        (one / "metadata.jsonl").read_text("utf-8").splitlines()
    )
