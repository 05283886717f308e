"""What a batch writes: PNGs (atomically), a journal per process, ``results.parquet``, ``metadata.jsonl``.

Layout of an output folder::

    OUT/images/<stem>-<job id>.png     one per finished job
    OUT/results.parquet                one row per job of the last run's plan (done or failed)
    OUT/metadata.jsonl                 one line per image: `datasets.load_dataset("imagefolder", data_dir=OUT)`
    OUT/README.md                      a dataset card (written by `push_to_hub`)
    OUT/.p2pz-batch/journal-<rank>.jsonl   what each process finished, one fsynced line a job

The journal is the truth for resuming: a job is done when its last line says so *and* its PNG is
there with the recorded sha256. A run killed between writing a PNG and its line redoes that job;
a line cut in half by a kill is ignored.

>>> from p2pz_directions.batch import results
>>> table = results.load_results("edited/")                  # doctest: +SKIP
>>> results.push_to_hub("edited/", "me/edited-pets")         # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from p2pz_directions.core.atomic import write_bytes
from p2pz_directions.core.errors import P2PZError

__all__ = [
    "COLUMNS",
    "Journal",
    "atomic_write",
    "finished_jobs",
    "load_results",
    "push_to_hub",
    "read_journals",
    "write_tables",
]

STATE_DIR = ".p2pz-batch"

#: columns of ``results.parquet``, in order
COLUMNS = (
    "job_id",
    "input",
    "input_sha256",
    "direction",
    "direction_name",
    "concept_hashes",
    "editor",
    "model",
    "options",
    "seed",
    "file_name",
    "sha256",
    "seconds",
    "error",
    "batch_size",
    "device",
    "process",
    "run_id",
)
#: columns copied into ``metadata.jsonl`` (besides ``file_name``)
METADATA_COLUMNS = (
    "job_id",
    "input",
    "direction",
    "direction_name",
    "editor",
    "model",
    "options",
    "seed",
    "sha256",
)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder, fsync, rename."""
    write_bytes(path, data)


def sha256_file(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class Journal:
    """Append-only JSONL of finished jobs for one process; each line flushed and fsynced."""

    def __init__(self, out: Path, rank: int):
        self.path = Path(out) / STATE_DIR / f"journal-{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the run

    def append(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False, allow_nan=True) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def read_journals(out: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The last record of every job in every journal of ``out`` (half-written lines skipped)."""
    latest: dict[str, tuple[float, dict[str, Any]]] = {}
    for path in sorted((Path(out) / STATE_DIR).glob("journal-*.jsonl")):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.endswith("\n"):
                    continue  # the last line of a killed run
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(rec, dict) or "job_id" not in rec:
                    continue
                t = float(rec.get("finished_at", 0.0))
                old = latest.get(rec["job_id"])
                if old is None or t >= old[0]:
                    latest[rec["job_id"]] = (t, rec)
    return {k: v[1] for k, v in latest.items()}


def finished_jobs(out: str | os.PathLike, records: dict[str, dict[str, Any]] | None = None) -> set[str]:
    """Ids of the jobs done in ``out``: recorded without error, PNG present with the recorded sha256."""
    out = Path(out)
    records = read_journals(out) if records is None else records
    done = set()
    for jid, rec in records.items():
        if rec.get("error") or not rec.get("file_name") or not rec.get("sha256"):
            continue
        if sha256_file(out / rec["file_name"]) == rec["sha256"]:
            done.add(jid)
    return done


def write_tables(out: str | os.PathLike, records: Sequence[dict[str, Any]]) -> tuple[Path, Path]:
    """Write ``results.parquet`` (every record) and ``metadata.jsonl`` (the images), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    rows = [{c: r.get(c) for c in COLUMNS} for r in records]
    schema = pa.schema(
        [
            ("job_id", pa.string()),
            ("input", pa.string()),
            ("input_sha256", pa.string()),
            ("direction", pa.string()),
            ("direction_name", pa.string()),
            ("concept_hashes", pa.list_(pa.string())),
            ("editor", pa.string()),
            ("model", pa.string()),
            ("options", pa.string()),
            ("seed", pa.int64()),
            ("file_name", pa.string()),
            ("sha256", pa.string()),
            ("seconds", pa.float64()),
            ("error", pa.string()),
            ("batch_size", pa.int64()),
            ("device", pa.string()),
            ("process", pa.int64()),
            ("run_id", pa.string()),
        ]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    res = out / "results.parquet"
    atomic_write(res, sink.getvalue().to_pybytes())
    lines = []
    for r in records:
        if r.get("error") or not r.get("file_name"):
            continue
        meta = {"file_name": r["file_name"], **{c: r.get(c) for c in METADATA_COLUMNS}}
        lines.append(json.dumps(meta, ensure_ascii=False) + "\n")
    meta_path = out / "metadata.jsonl"
    atomic_write(meta_path, "".join(lines).encode("utf-8"))
    return res, meta_path


def load_results(out: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of ``OUT/results.parquet`` as dicts."""
    import pyarrow.parquet as pq

    path = Path(out) / "results.parquet"
    if not path.is_file():
        raise P2PZError(f"no results table in {out}: run `p2pz batch ... --out {out}` first")
    return pq.read_table(path).to_pylist()


# ---------------------------------------------------------------------------------------------------
# the Hub
# ---------------------------------------------------------------------------------------------------
def dataset_card(repo_id: str, records: Iterable[dict[str, Any]]) -> str:
    """A dataset card whose YAML makes the Hub (and ``load_dataset(repo_id)``) read the folder as an
    image folder: the images with ``metadata.jsonl``; ``results.parquet`` rides along."""
    recs = list(records)
    done = [r for r in recs if not r.get("error")]
    editors = sorted({r["editor"] for r in done if r.get("editor")})
    dirs = sorted({r.get("direction_name") or r["direction"] for r in done if r.get("direction")})
    lines = [
        "---",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        "    path:",
        "    - metadata.jsonl",
        '    - "images/*.png"',
        "tags:",
        "- p2pz-directions",
        "- image-editing",
        "---",
        "",
        f"# {repo_id}",
        "",
        f"{len(done)} images edited with p2pz-directions (`p2pz batch`): editors {', '.join(editors) or '-'}; "
        f"directions {', '.join(dirs) or '-'}.",
        "",
        "Each image's row holds its job: input, direction (and the concept hashes it was built from),",
        "editor, model, options and seed. `results.parquet` also lists the jobs that failed, with their error.",
        "",
        "```python",
        "from datasets import load_dataset",
        f'ds = load_dataset("{repo_id}", split="train")',
        "```",
        "",
    ]
    return "\n".join(lines)


def push_to_hub(
    out: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
) -> str:
    """Publish the output folder as a Hub dataset (images, metadata.jsonl, results.parquet, a card).

    Returns the commit's URL. Needs ``results.parquet`` (a finished `run`).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HfHubHTTPError

    out = Path(out)
    recs = load_results(out)
    atomic_write(out / "README.md", dataset_card(repo_id, recs).encode("utf-8"))
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(out),
            repo_id=repo_id,
            repo_type="dataset",
            allow_patterns=["images/*.png", "metadata.jsonl", "results.parquet", "README.md"],
            commit_message=commit_message or f"p2pz batch: {sum(not r.get('error') for r in recs)} images",
        )
    except HfHubHTTPError as e:
        raise P2PZError(
            f"cannot push {out} to the Hub dataset {repo_id!r}: {' '.join(str(e).split())}. Log in with "
            f"`hf auth login` (a token with write access) and check the repo id"
        ) from None
    return str(getattr(info, "commit_url", info))
