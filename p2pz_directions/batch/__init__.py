"""Batch editing: folders, job files and datasets -> one PNG per job, ``results.parquet``, resumable,
on every GPU of a machine through ``accelerate``.

>>> from p2pz_directions import batch
>>> report = batch.run("photos/", directions=["cat->dog", "cat->tiger"], seeds=[0, 1],
...                    editor="pix2pix-zero", out="edited/")                   # doctest: +SKIP
>>> report.done, report.failed                                                 # doctest: +SKIP
(8, 0)
>>> batch.load_results("edited/")[0]["file_name"]                             # doctest: +SKIP
'images/cat-3f6a0c1b2d4e5f60.png'
>>> batch.push_to_hub("edited/", "me/edited-photos")                          # doctest: +SKIP

The same from the shell (``p2pz batch --help``)::

    p2pz batch photos/ -d "cat->dog" --out edited/
    p2pz batch jobs.jsonl --out edited/
    p2pz batch --dataset user/pets --split train -d "cat->dog" --seeds 0,1 --out edited/
    accelerate launch -m p2pz_directions.batch photos/ -d "cat->dog" --out edited/
    p2pz batch photos/ -d "cat->dog" --out edited/ --gpus 4

- `jobs`: inputs and the cross product into `Job`\\ s with stable ids;
- `runner`: the run (`run`, `run_jobs`, `BatchReport`);
- `results`: the output folder (atomic PNGs, journals, ``results.parquet``, ``metadata.jsonl``, the Hub).
"""

from __future__ import annotations

from p2pz_directions.batch.jobs import (
    InputImage,
    Job,
    JobFileError,
    collect_inputs,
    dataset_inputs,
    make_jobs,
)
from p2pz_directions.batch.results import load_results, push_to_hub
from p2pz_directions.batch.runner import BatchReport, plan_jobs, run, run_jobs

__all__ = [
    "BatchReport",
    "InputImage",
    "Job",
    "JobFileError",
    "collect_inputs",
    "dataset_inputs",
    "load_results",
    "make_jobs",
    "plan_jobs",
    "push_to_hub",
    "run",
    "run_jobs",
]
