"""Running a plan of jobs: one warm editor per device, batched edits, background load and save, resume.

`run` is the whole batch in one call; under ``accelerate launch`` each process runs its shard of
the plan (whole batches, round robin) and process 0 merges one results table at the end.

The steps of a run (every process):

1. plan the jobs (the same plan in every process: it only depends on the inputs and arguments);
2. drop those already done (journal line + PNG with the recorded sha256), shard the rest;
3. per batch: images loaded by a background thread; the editor (made once, kept warm) edits jobs
   of one group (editor, model, direction, options) and image size together when the editor takes a
   list of images *and* the batched result was proven equal to the single one (once per kind of job:
   the last job of the first batch is also edited alone and compared pixel for pixel); otherwise one
   call per image;
4. a background thread encodes each PNG, writes it atomically and appends its journal line;
5. process 0 merges every journal into ``results.parquet`` and ``metadata.jsonl``.

A job that fails (unreadable image, unknown direction, NaN edit, ...) is recorded with its error and
printed on stderr; the others go on. Ctrl-C stops after the batch in flight (a second one at once):
what is done is saved, and the same command again finishes the rest.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import queue
import signal
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pz_directions.batch import results as res_mod
from p2pz_directions.batch.jobs import (
    InputImage,
    Job,
    collect_inputs,
    dataset_inputs,
    make_jobs,
    parse_seeds,
    parse_sweep,
)
from p2pz_directions.core.errors import P2PZError, StoreLockedError

__all__ = ["BatchReport", "run", "run_jobs"]

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"


@dataclass
class BatchReport:
    """What a run did. ``records`` (process 0 only) are the rows of ``results.parquet``."""

    out: Path
    total: int
    done: int = 0
    skipped: int = 0
    failed: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    is_main: bool = True

    @property
    def ok(self) -> bool:
        """No job failed and the run was not interrupted."""
        return not self.failed and not self.interrupted

    @property
    def exit_code(self) -> int:
        """0 all done, 1 some job failed, 130 interrupted (Ctrl-C)."""
        return 130 if self.interrupted else (1 if self.failed else 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "total": self.total,
            "done": self.done,
            "skipped": self.skipped,
            "failed": self.failed,
            "interrupted": self.interrupted,
            "seconds": round(self.seconds, 3),
            "devices": self.devices,
            "notes": self.notes,
            "results": str(self.out / "results.parquet"),
        }


# ---------------------------------------------------------------------------------------------------
# loading and saving in the background
# ---------------------------------------------------------------------------------------------------
def load_input(inp: InputImage) -> Any:
    """The input as an RGB PIL image (an `ImageError` naming it when it cannot be read)."""
    from PIL import Image, UnidentifiedImageError

    from p2pz_directions.editing.images import ImageError, load_image, to_rgb

    src = inp.source
    if isinstance(src, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(src)) as im:
                im.load()
                return to_rgb(im)
        except (UnidentifiedImageError, OSError) as e:
            raise ImageError(f"{inp.name} is not an image Pillow can read ({e})") from None
    return load_image(src)


class _Saver:
    """A thread that encodes PNGs, writes them atomically and appends journal lines, in order."""

    def __init__(self, out: Path, journal: res_mod.Journal, on_error: Callable[[dict[str, Any]], None]):
        self.out = out
        self.journal = journal
        self.on_error = on_error
        self.q: queue.Queue[tuple[dict[str, Any], Any] | None] = queue.Queue(maxsize=64)
        self.thread = threading.Thread(target=self._loop, name="p2pz-batch-saver", daemon=True)
        self.thread.start()

    def put(self, record: dict[str, Any], image: Any = None) -> None:
        self.q.put((record, image))

    def _loop(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            rec, image = item
            if image is not None:
                try:
                    buf = io.BytesIO()
                    image.save(buf, format="PNG")
                    data = buf.getvalue()
                    import hashlib

                    rec["sha256"] = hashlib.sha256(data).hexdigest()
                    res_mod.atomic_write(self.out / rec["file_name"], data)
                except Exception as e:  # noqa: BLE001 - a write that fails is this job's error
                    rec.update(file_name=None, sha256=None, error=f"cannot write the image: {e}")
            rec["finished_at"] = time.time()
            self.journal.append(rec)
            if rec.get("error"):
                self.on_error(rec)

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()


class _Follower:
    """Counts this run's finished / failed lines in every journal (for the one progress bar)."""

    def __init__(self, out: Path, run_id: str):
        self.dir = out / res_mod.STATE_DIR
        self.run_id = run_id
        self.offsets: dict[Path, int] = {}
        self.done = 0
        self.failed = 0

    def poll(self) -> None:
        for path in self.dir.glob("journal-*.jsonl"):
            off = self.offsets.get(path, 0)
            try:
                with open(path, "rb") as f:
                    f.seek(off)
                    chunk = f.read()
            except OSError:
                continue
            end = chunk.rfind(b"\n") + 1
            self.offsets[path] = off + end
            for line in chunk[:end].splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("run_id") == self.run_id:
                    self.done += 1
                    self.failed += bool(rec.get("error"))


# ---------------------------------------------------------------------------------------------------
# the worker
# ---------------------------------------------------------------------------------------------------
def pixel_difference(a: Any, b: Any) -> int | None:
    """The largest difference of two images in 8-bit levels (None when they cannot be compared)."""
    import numpy as np

    if not (hasattr(a, "size") and hasattr(b, "size")) or a.size != b.size:
        return None
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def _message(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


class _Worker:
    """One process's editing loop: warm editors, resolved directions, batched or single calls."""

    def __init__(
        self,
        *,
        device: Any,
        dtype: Any,
        check_batch: bool,
        editors: dict[str, Any] | None,
        note: Callable[[str], None],
        tolerance: int = 0,
    ):
        self.device = device
        self.dtype = dtype
        self.check_batch = check_batch
        self.tolerance = tolerance
        self.note = note
        self._editors: dict[tuple[str, str], Any] = {}
        self._given = dict(editors or {})
        self._directions: dict[tuple[str, str, str], Any] = {}
        self._batch_ok: dict[tuple[str, str, str], bool] = {}
        self.edit_seconds = 0.0

    def editor(self, name: str, model: str) -> Any:
        key = (name, model)
        if key not in self._editors:
            if name in self._given:
                self._editors[key] = self._given[name]
            else:
                from p2pz_directions import editors

                try:
                    self._editors[key] = editors.get(name, model=model, device=self.device, dtype=self.dtype)
                except Exception as e:  # noqa: BLE001 - every job of this editor fails with it
                    self._editors[key] = e
        ed = self._editors[key]
        if isinstance(ed, Exception):
            raise ed
        return ed

    def warm(self, keys: set[tuple[str, str]]) -> None:
        """Make the editors and load their weights (errors surface in the jobs that need them)."""
        for name, model in sorted(keys):
            try:
                ed = self.editor(name, model)
                if hasattr(ed, "load_components"):
                    ed.load_components()
            except Exception:  # noqa: BLE001, S112 - the jobs of this editor fail with the reason
                continue

    def direction(self, ed: Any, job: Job) -> Any:
        key = (job.editor, job.model, job.direction)
        if key not in self._directions:
            try:
                self._directions[key] = ed.resolve_direction(job.direction)
            except Exception as e:  # noqa: BLE001 - unknown direction: its jobs fail, others go on
                self._directions[key] = e
        d = self._directions[key]
        if isinstance(d, Exception):
            raise d
        return d

    def _single(self, ed: Any, d: Any, job: Job, image: Any) -> tuple[Any, float]:
        t0 = time.perf_counter()
        try:
            out = ed.edit(image, d, seed=job.seed, **job.options).image
            if isinstance(out, list) and len(out) == 1:
                out = out[0]
            if not hasattr(out, "save"):
                raise P2PZError(
                    f"editor {job.editor!r} returned {type(out).__name__}, not one image; a batch job makes one "
                    f"image (drop num_images_per_prompt; use --seeds for several)"
                )
        except Exception as e:  # noqa: BLE001 - recorded as this job's error
            out = e
        dt = time.perf_counter() - t0
        self.edit_seconds += dt
        return out, dt

    def _batched(self, ed: Any, d: Any, jobs: Sequence[Job], images: Sequence[Any]) -> list[Any]:
        import torch

        gens = [torch.Generator().manual_seed(j.seed) for j in jobs]
        t0 = time.perf_counter()
        res = ed.edit(list(images), d, generator=gens, **jobs[0].options)
        outs = res.images if hasattr(res, "images") else res.image
        if not isinstance(outs, list) or len(outs) != len(jobs) or not all(hasattr(o, "save") for o in outs):
            raise P2PZError(f"a batched edit of {len(jobs)} images did not give {len(jobs)} images")
        self.edit_seconds += time.perf_counter() - t0
        return outs

    def edit(self, jobs: Sequence[Job], images: Sequence[Any]) -> list[tuple[Any, float, int]]:
        """Edit jobs of one group and image size: ``[(image or exception, seconds, batch size)]``."""
        first = jobs[0]
        try:
            ed = self.editor(first.editor, first.model)
            d = self.direction(ed, first)
        except Exception as e:  # noqa: BLE001
            return [(e, 0.0, 1) for _ in jobs]
        kind = (first.editor, first.model, first.options_json)
        if len(jobs) > 1 and self._batch_ok.get(kind, True):
            t0 = time.perf_counter()
            try:
                outs = self._batched(ed, d, jobs, images)
            except Exception as e:  # noqa: BLE001 - the editor takes no lists (yet): one call per image
                if kind not in self._batch_ok:
                    self._batch_ok[kind] = False
                    self.note(f"{first.editor}: editing one image per call ({_message(e)[:160]})")
            else:
                each = (time.perf_counter() - t0) / len(jobs)
                if self.check_batch and kind not in self._batch_ok:
                    alone, dt = self._single(ed, d, jobs[-1], images[-1])
                    diff = pixel_difference(alone, outs[-1])
                    same = diff is not None and diff <= self.tolerance
                    self._batch_ok[kind] = same
                    if not same:
                        self.note(
                            f"{first.editor}: a batched edit differs from the same job alone "
                            f"(by {diff if diff is not None else '?'} levels, tolerance {self.tolerance}); "
                            f"editing one image per call"
                        )
                        rest = [
                            (*self._single(ed, d, j, im), 1)
                            for j, im in zip(jobs[:-1], images[:-1], strict=True)
                        ]
                        return [*rest, (alone, dt, 1)]
                elif not self.check_batch:
                    self._batch_ok[kind] = True
                return [(o, each, len(jobs)) for o in outs]
        return [(*self._single(ed, d, j, im), 1) for j, im in zip(jobs, images, strict=True)]


def _direction_info(worker: _Worker, job: Job) -> tuple[str | None, list[str]]:
    d = worker._directions.get((job.editor, job.model, job.direction))
    if d is None or isinstance(d, Exception):
        return None, []
    hashes = []
    for c in (getattr(d, "source", None), getattr(d, "target", None)):
        if c is not None:
            hashes.append(f"{c.ref}={c.content_hash or ''}")
    return d.name, hashes


# ---------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------
def _units(jobs: Sequence[Job], batch_size: int) -> list[list[Job]]:
    """Consecutive chunks of at most ``batch_size`` jobs of one group (plan order kept inside groups)."""
    groups: dict[tuple, list[Job]] = {}
    for j in jobs:
        groups.setdefault(j.group, []).append(j)
    units = []
    for g in groups.values():
        units.extend(g[i : i + batch_size] for i in range(0, len(g), batch_size))
    return units


def _state(device: Any) -> Any:
    from accelerate import PartialState

    return PartialState(cpu=str(device or "").startswith("cpu"))


def _share_run_id(state: Any) -> str:
    run_id = uuid.uuid4().hex[:12]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        run_id = broadcast_object_list([run_id])[0]
    return run_id


def run_jobs(
    plan: Sequence[Job],
    out: str | os.PathLike,
    *,
    batch_size: int = 4,
    device: Any = None,
    dtype: Any = None,
    check_batch: bool = True,
    batch_tolerance: int = 0,
    editors: dict[str, Any] | None = None,
    progress: bool = True,
    err_console: Any = None,
) -> BatchReport:
    """Run ``plan`` into ``out`` (see the module doc). Under ``accelerate launch`` every process calls
    this with the same plan; each edits its shard; process 0's report holds the merged table."""
    from rich.console import Console

    from p2pz_directions.editing.images import ImageResizedWarning

    if batch_size < 1:
        raise P2PZError(f"batch size must be at least 1, not {batch_size}")
    out = Path(out)
    err = err_console or Console(stderr=True, highlight=False)
    t_start = time.perf_counter()
    state = _state(device)
    rank, world = state.process_index, state.num_processes
    if world > 1:
        device = "cpu" if str(device or "").startswith("cpu") else state.device
    is_main = rank == 0
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / res_mod.STATE_DIR).mkdir(parents=True, exist_ok=True)

    from filelock import FileLock, Timeout

    lock = FileLock(str(out / res_mod.STATE_DIR / f"lock-{rank}"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise StoreLockedError(
            f"another p2pz batch is writing to {out} (process {rank}); wait for it to finish or use another --out"
        ) from None
    try:
        if is_main:
            for tmp in (out / "images").glob(".*.tmp"):  # half-written PNGs of a killed run
                tmp.unlink(missing_ok=True)
        records = res_mod.read_journals(out)
        finished = res_mod.finished_jobs(out, records)
        todo = [j for j in plan if j.id not in finished]
        skipped = len(plan) - len(todo)
        run_id = _share_run_id(state)
        state.wait_for_everyone()
        mine = _units(todo, batch_size)[rank::world]

        report = BatchReport(out=out, total=len(plan), skipped=skipped, is_main=is_main)
        notes: set[str] = set()

        def note(msg: str) -> None:
            if msg not in notes:
                notes.add(msg)
                report.notes.append(msg)
                err.print(f"note: {msg}", markup=False)

        def on_error(rec: dict[str, Any]) -> None:
            err.print(
                f"error: job {rec['job_id']} ({rec['input']}, {rec['direction']}, seed {rec['seed']}): {rec['error']}",
                markup=False,
                soft_wrap=True,
            )

        journal = res_mod.Journal(out, rank)
        saver = _Saver(out, journal, on_error)
        worker = _Worker(
            device=device,
            dtype=dtype,
            check_batch=check_batch,
            editors=editors,
            note=note,
            tolerance=batch_tolerance,
        )
        dev_label = str(device or "default")
        bar = _Bar(out, run_id, len(plan), skipped, err) if (progress and is_main) else None
        loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="p2pz-batch-load")
        n_done = n_failed = 0
        t_load = time.perf_counter()
        worker.warm({(u[0].editor, u[0].model) for u in mine})  # weights in memory before the clock starts
        load_seconds = time.perf_counter() - t_load
        t_work = time.perf_counter()

        def load(unit: list[Job]) -> list[Any]:
            outs = []
            for j in unit:
                try:
                    outs.append(load_input(j.input))
                except Exception as e:  # noqa: BLE001 - recorded as the job's error
                    outs.append(e)
            return outs

        def record(job: Job, result: Any, seconds: float, bs: int) -> dict[str, Any]:
            name, hashes = _direction_info(worker, job)
            failed = isinstance(result, BaseException)
            return {
                "job_id": job.id,
                "input": job.input.name,
                "input_sha256": job.input.sha256,
                "direction": job.direction,
                "direction_name": name,
                "concept_hashes": hashes,
                "editor": job.editor,
                "model": job.model,
                "options": job.options_json,
                "seed": job.seed,
                "file_name": None if failed else job.file_name,
                "sha256": None,
                "seconds": round(seconds, 4),
                "error": _message(result) if failed else None,
                "batch_size": bs,
                "device": dev_label,
                "process": rank,
                "run_id": run_id,
            }

        pending: deque[tuple[list[Job], Future]] = deque()
        it = iter(mine)
        stop = threading.Event()
        current: list[Job] | None = None
        old_handler = None
        if threading.current_thread() is threading.main_thread():

            def on_sigint(signum: int, frame: Any) -> None:
                if stop.is_set():
                    raise KeyboardInterrupt
                stop.set()
                err.print("stopping after the batch in flight (Ctrl-C again to stop now)", markup=False)

            old_handler = signal.signal(signal.SIGINT, on_sigint)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ImageResizedWarning)
                if bar is not None:
                    bar.start()
                for unit in it:  # keep two batches loading ahead
                    pending.append((unit, loader.submit(load, unit)))
                    if len(pending) >= 3:
                        break
                while pending and not stop.is_set():
                    unit, fut = pending.popleft()
                    current = unit
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.append((nxt, loader.submit(load, nxt)))
                    images = fut.result()
                    ok: list[tuple[Job, Any]] = []
                    for j, im in zip(unit, images, strict=True):
                        if isinstance(im, BaseException):
                            saver.put(record(j, im, 0.0, 1))
                            n_failed += 1
                        else:
                            ok.append((j, im))
                    by_size: dict[tuple[int, int], list[tuple[Job, Any]]] = {}
                    for j, im in ok:
                        by_size.setdefault(im.size, []).append((j, im))
                    for pairs in by_size.values():
                        js = [j for j, _ in pairs]
                        outs = worker.edit(js, [im for _, im in pairs])
                        for j, (result, seconds, bs) in zip(js, outs, strict=True):
                            failed = isinstance(result, BaseException)
                            saver.put(record(j, result, seconds, bs), None if failed else result)
                            n_failed += failed
                            n_done += not failed
                    current = None
        except KeyboardInterrupt:
            stop.set()
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
            report.interrupted = stop.is_set() and (bool(pending) or current is not None)
            for _, fut in pending:
                fut.cancel()
            loader.shutdown(wait=False, cancel_futures=True)
            saver.close()
            journal.close()
            if bar is not None:
                bar.stop()
        wall = time.perf_counter() - t_work
        report.done, report.failed = n_done, n_failed
        stats = {
            "process": rank,
            "device": dev_label,
            "jobs": n_done + n_failed,
            "done": n_done,
            "failed": n_failed,
            "seconds": round(wall, 3),
            "load_seconds": round(load_seconds, 3),
            "edit_seconds": round(worker.edit_seconds, 3),
            "images_per_s": round(n_done / wall, 4) if wall > 0 else 0.0,
        }
        res_mod.atomic_write(
            out / res_mod.STATE_DIR / f"stats-{run_id}-{rank}.json", json.dumps(stats).encode("utf-8")
        )
        if is_main and not report.interrupted:
            # wait for every process's stats file, not a collective barrier: a process whose shard
            # was quick must not time out while another is still editing
            while not all(
                (out / res_mod.STATE_DIR / f"stats-{run_id}-{r}.json").is_file() for r in range(world)
            ):
                time.sleep(0.2)
        if is_main:
            records = res_mod.read_journals(out)
            rows = [records[j.id] for j in plan if j.id in records]
            res_mod.write_tables(out, rows)
            report.records = rows
            this_run = [r for r in rows if r.get("run_id") == run_id]
            report.done = sum(not r.get("error") for r in this_run)
            report.failed = sum(bool(r.get("error")) for r in rows)
            for p in sorted((out / res_mod.STATE_DIR).glob(f"stats-{run_id}-*.json")):
                try:
                    report.devices.append(json.loads(p.read_text("utf-8")))
                except (OSError, ValueError):
                    continue
            report.devices.sort(key=lambda s: s.get("process", 0))
        report.seconds = time.perf_counter() - t_start
        return report
    finally:
        lock.release()


class _Bar:
    """One rich bar for the whole run (all processes): done / failed / ETA, fed by the journals."""

    def __init__(self, out: Path, run_id: str, total: int, skipped: int, console: Any):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.follow = _Follower(out, run_id)
        self.skipped = skipped
        self.progress = Progress(
            TextColumn("[bold]batch"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self.task = self.progress.add_task("batch", total=total, completed=skipped, failed=0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="p2pz-batch-progress", daemon=True)

    def start(self) -> None:
        self.progress.start()
        self._thread.start()

    def _update(self) -> None:
        self.follow.poll()
        self.progress.update(self.task, completed=self.skipped + self.follow.done, failed=self.follow.failed)

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            self._update()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._update()
        self.progress.stop()


def run(
    inputs: Any = (),
    *,
    out: str | os.PathLike,
    batch_size: int = 4,
    device: Any = None,
    dtype: Any = None,
    check_batch: bool = True,
    batch_tolerance: int = 0,
    editors: dict[str, Any] | None = None,
    progress: bool = True,
    **plan: Any,
) -> BatchReport:
    """Edit every input along every direction with every seed (and option sweep); see the module doc.

    `plan_jobs` then `run_jobs`: ``inputs`` and ``plan`` are `plan_jobs`'s (``directions``,
    ``seeds``, ``editor``, ``model``, ``options``, ``sweep``, ``dataset``, ``split``,
    ``image_column``, ``prompt_column``, ``dataset_config``, ``limit``), the rest `run_jobs`'s.
    ``inputs``: folders, globs, image files, job files (``.jsonl``/``.csv``), in-memory images, or a
    ``datasets.Dataset``; ``dataset``: a Hub id or local dataset folder (with ``split``,
    ``image_column``, ``prompt_column``). ``sweep``: ``{"strength": [0.5, 0.75]}``. ``editors``:
    ready editors by name (e.g. made with ``pipe=``), used instead of ``editors.get``.
    ``batch_tolerance``: how many 8-bit levels a batched edit may differ from the job alone and still
    be used (0: equal pixels; GPU kernels for other batch sizes may round differently).

    >>> from p2pz_directions import batch
    >>> report = batch.run("photos/", directions=["cat->dog"], editor="sdedit", seeds=[0, 1],
    ...                    options={"prompt": "a photo of a cat"}, out="edited/")   # doctest: +SKIP
    >>> report.done, report.failed, report.records[0]["file_name"]                # doctest: +SKIP
    """
    unknown = set(plan) - _PLAN_KEYWORDS
    if unknown:
        raise TypeError(
            f"batch.run() got unknown keyword(s) {', '.join(sorted(unknown))}; it takes those of "
            f"plan_jobs ({', '.join(sorted(_PLAN_KEYWORDS))}) and of run_jobs"
        )
    return run_jobs(
        plan_jobs(inputs, **plan),
        out,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        check_batch=check_batch,
        batch_tolerance=batch_tolerance,
        editors=editors,
        progress=progress,
    )


def plan_jobs(
    inputs: Any = (),
    *,
    directions: Sequence[str] | str = (),
    seeds: Sequence[int] | str | int = (0,),
    editor: str = "pix2pix-zero",
    model: str | os.PathLike = DEFAULT_MODEL,
    options: dict[str, Any] | None = None,
    sweep: dict[str, Sequence[Any]] | Sequence[str] | None = None,
    dataset: Any = None,
    split: str | None = "train",
    image_column: str = "image",
    prompt_column: str | None = None,
    dataset_config: str | None = None,
    limit: int | None = None,
) -> list[Job]:
    """The jobs `run` would do (nothing is loaded but the inputs' bytes, to hash them)."""
    if isinstance(inputs, (str, os.PathLike)) or not isinstance(inputs, Sequence):
        if _is_dataset(inputs):
            dataset, inputs = inputs, ()
        elif isinstance(inputs, (str, os.PathLike)) or hasattr(inputs, "size"):
            inputs = [inputs]
        else:
            inputs = list(inputs)
    if inputs and all(isinstance(i, Job) for i in inputs):
        return list(inputs)
    found = collect_inputs(inputs)
    if dataset is not None:
        found += dataset_inputs(
            dataset,
            split=split,
            image_column=image_column,
            prompt_column=prompt_column,
            config=dataset_config,
            limit=limit,
        )
    elif limit is not None:
        found = found[:limit]
    if not found:
        raise P2PZError("nothing to edit: give images, folders, globs, job files or --dataset")
    if isinstance(directions, str):
        directions = [directions]
    return make_jobs(
        found,
        directions=list(directions),
        seeds=parse_seeds(seeds),
        editor=editor,
        model=os.fspath(model),
        options=options,
        sweep=parse_sweep(sweep),
    )


_PLAN_KEYWORDS = frozenset(inspect.signature(plan_jobs).parameters) - {"inputs"}


def _is_dataset(obj: Any) -> bool:
    mod = type(obj).__module__ or ""
    return mod.startswith("datasets") and hasattr(obj, "column_names")


def print_summary(report: BatchReport, console: Any) -> None:
    """The end-of-run lines: counts, where the table is, images/s per device."""
    from rich.table import Table

    console.print(
        f"{report.total} jobs: {report.done} edited now, {report.skipped} already done, {report.failed} failed"
        + (" (interrupted: run the same command again to finish)" if report.interrupted else "")
        + f"; {report.seconds:.1f} s",
        markup=False,
    )
    if report.devices:
        t = Table(title=None, box=None)
        for col in ("process", "device", "jobs", "failed", "load s", "edit s", "images/s"):
            t.add_column(col, justify="right" if col not in ("device",) else "left")
        for s in report.devices:
            t.add_row(
                str(s["process"]),
                str(s["device"]),
                str(s["jobs"]),
                str(s["failed"]),
                f"{s.get('load_seconds', 0.0):.1f}",
                f"{s['seconds']:.1f}",
                f"{s['images_per_s']:.3f}",
            )
        console.print(t)
    console.print(f"results: {report.out / 'results.parquet'}", markup=False)
