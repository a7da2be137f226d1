"""Where a benchmark ran: device tag (results folder name) and the versions every result records."""

import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _slug(s: str) -> str:
    return "-".join("".join(c.lower() if c.isalnum() else " " for c in s).split())


def device_tag() -> str:
    """Folder name under benchmarks/results/: the GPU's name, or the CPU model and thread count."""
    if torch.cuda.is_available():
        return _slug(torch.cuda.get_device_name(0))
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu-{_slug(model)}-{torch.get_num_threads()}t"


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else device_tag(),
        "device_tag": device_tag(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "threads": torch.get_num_threads(),
        "commit": commit,
    }


def merge_rows(folder: Path, name: str, new_rows: list, key, env: dict, render, *, list_key: str = "rows",
               sort_key=None) -> list:
    """Merge ``new_rows`` into ``folder/<name>.json`` (``{"environment": env, list_key: rows}``), replacing the
    saved rows whose ``key(row)`` one of them has, and let ``render(rows)`` rewrite the tables, all under an
    exclusive lock on ``folder/.<name>.lock``, so that several benchmark jobs can write to one folder side by
    side. Returns the merged rows."""
    import fcntl
    import json

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = folder / f"{name}.json"
        rows = json.loads(path.read_text())[list_key] if path.exists() else []
        keys = {key(r) for r in new_rows}
        rows = [r for r in rows if key(r) not in keys] + list(new_rows)
        if sort_key is not None:
            rows.sort(key=sort_key)
        path.write_text(json.dumps({"environment": env, list_key: rows}, indent=2, default=str))
        render(rows)
    return rows
