"""One cell of a ``fastpurify sweep``: load its inputs, purify, evaluate before and after, write its row.

A worker is a spawned process (:func:`worker_main`) that receives cells (plain dicts, see
:func:`fastpurify.sweep.plan_cells`) over a pipe, runs each one with the same code as ``fastpurify purify``
(:func:`fastpurify.cli_purify.run_defense` and :func:`fastpurify.cli_purify.before_after`), writes the finished
row atomically to ``<out_dir>/cells/<cell id>.json`` and sends it back. A cell whose defense fails (a
DivergenceError, a time budget too short for one step, a backend that cannot run) gives a row with
``status: "failed"`` and the error; the worker goes on with the next cell.
"""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Optional

# The row fields a cell copies from its plan (the rest come from the run).
PLAN_FIELDS = ("study", "cell", "defense", "recipe", "checkpoint", "seed", "reference", "clean_count", "eval_count")
# The fields a run fills in (None until then, and after a failure where it got no result).
RESULT_FIELDS = ("acc_before", "asr_before", "ra_before", "acc_after", "asr_after", "ra_after", "der",
                 "defense_seconds", "eval_seconds", "seconds", "rounds", "path", "device")


def write_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it and ``os.replace``: a reader (or a rerun after
    a kill) sees either no file or the whole one, never a torn one."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=1, default=str))


def base_row(cell: Dict[str, Any]) -> Dict[str, Any]:
    """The row of ``cell`` before it runs: its plan fields, empty results."""
    row = {k: cell.get(k) for k in PLAN_FIELDS}
    ck = cell["ckpt"]
    row.update(checkpoint=ck["name"], arch=ck.get("arch"), settings=cell["settings"], status="pending", error=None)
    row.update(dict.fromkeys(RESULT_FIELDS))
    return row


def _workload(cell: Dict[str, Any], cache: Dict[Any, Any], device):
    """What a cell runs on: ``(model, (x, y), extra defense options, measure)`` with ``measure(result) -> (before,
    after, eval seconds)``. The one place a checkpoint kind becomes a model and data: ``kind: "path"`` is a file
    loaded into ``arch`` (a built-in name or a factory, as ``purify --arch/--model`` loads it) with CIFAR-10 and
    the entry's trigger and target; ``kind: "record"`` is a BackdoorBench record (fastpurify.backdoorbench), which
    carries its model, its triggered test images and its normalisation. Data and triggers are kept per worker."""
    from .cli_purify import before_after
    from .data import load_cifar10
    from .models.factory import load_model
    from .triggers import parse_trigger

    ck = cell["ckpt"]
    if ck["kind"] == "record":
        from .sweep import record_reader

        rec = record_reader()(ck["path"], ck["data"], model=ck["arch"], model_kwargs=ck.get("model_kwargs"),
                              clean_count=cell["clean_count"], eval_count=cell["eval_count"])
        model = rec.model.to(device)

        def measure_record(result):
            t0 = time.perf_counter()
            before, after = rec.evaluate(model, device=device), rec.evaluate(result.model, device=device)
            return before, after, time.perf_counter() - t0 + result.timings.get("eval", 0.0)

        return model, rec.clean_train, {"normalization": rec.normalization}, measure_record
    key = ("data", ck["data"], cell["clean_count"], cell["eval_count"])
    if key not in cache:
        cache[key] = (load_cifar10(ck["data"], split="train", count=cell["clean_count"]),
                      load_cifar10(ck["data"], split="test", count=cell["eval_count"]))
    if ("trigger", ck["trigger"]) not in cache:
        cache[("trigger", ck["trigger"])] = parse_trigger(ck["trigger"])
    (x, y), (xt, yt) = cache[key]
    trigger = cache[("trigger", ck["trigger"])]
    model = load_model(ck["path"], ck["arch"], ck.get("model_kwargs")).to(device)
    return model, (x, y), {}, lambda result: before_after(model, result, xt, yt, trigger, ck["target"], device)


def run_cell(cell: Dict[str, Any], cache: Optional[Dict[Any, Any]] = None) -> Dict[str, Any]:
    """Run one cell and return its finished row (``status`` is the defense's, or ``"failed"`` with ``error``)."""
    from .cli import _device
    from .cli_purify import run_defense
    from .metrics import der

    row = base_row(cell)
    t0 = time.perf_counter()
    try:
        device = _device(cell["device"])
        model, (x, y), extra, measure = _workload(cell, {} if cache is None else cache, device)
        result = run_defense(cell["defense"], model, x, y, reference=cell["reference"], seed=cell["seed"],
                             device=device, progress=False, **{**extra, **cell["settings"]})
        before, after, eval_s = measure(result)
        b, a = before.as_dict(), after.as_dict()
        row.update({f"{k}_before": b[k] for k in ("acc", "asr", "ra")})
        row.update({f"{k}_after": a[k] for k in ("acc", "asr", "ra")})
        row.update(status=result.status, der=der(before, after), defense_seconds=result.timings.get("defense"),
                   eval_seconds=eval_s, rounds=len(result.history), device=str(device),
                   path="reference" if cell["reference"] else "fast", config=result.config)
    except Exception as e:  # noqa: BLE001 - any failure of one cell is recorded in its row; the others go on
        row.update(status="failed", error=f"{type(e).__name__}: {e}")
        if os.environ.get("FASTPURIFY_DEBUG") == "1":
            row["traceback"] = traceback.format_exc()
    row["seconds"] = time.perf_counter() - t0
    row["worker"] = os.getpid()
    row["threads"] = _threads()
    row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return row


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def worker_main(conn, threads: int, cells_dir: str) -> None:
    """A worker process: run the cells sent over ``conn`` (``None`` ends it) on ``threads`` intra-op threads,
    write each finished row to ``cells_dir`` and send it back. Ctrl-C is the parent's business (it stops the
    workers); a worker whose parent is gone stops after its current cell."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(max(1, int(threads)))
    parent = os.getppid()
    cache: Dict[Any, Any] = {}
    while True:
        while not conn.poll(1.0):
            if os.getppid() != parent:
                return
        try:
            cell = conn.recv()
        except EOFError:
            return
        if cell is None:
            return
        row = run_cell(cell, cache)
        write_json_atomic(Path(cells_dir) / f"{cell['cell']}.json", row)
        try:
            conn.send(row)
        except (BrokenPipeError, OSError):
            return
