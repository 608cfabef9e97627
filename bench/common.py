"""Shared benchmark plumbing: device set-up, interleaved timing, machine info, profiles, JSON and tables."""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import json
import os
import platform
import pstats
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
# The real data (../shared/data beside the checkout); AEKT_SHARED_DATA points elsewhere, e.g. on a GPU
# machine where the data was carried in (bench/device_session.sh bench20).
SHARED_DATA = Path(os.environ.get("AEKT_SHARED_DATA") or REPO.parent / "shared" / "data")


# ---- device ------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine; use --device cpu.")
    if device.type == "cuda":
        # Steady-state timings: let cuDNN pick its fastest kernels during the warm-up steps.
        torch.backends.cudnn.benchmark = True
    return device


def default_precision(device: torch.device) -> str:
    # bf16 autocast is what a GPU run uses (DESIGN "Speed"); on most CPUs bf16 is slower than fp32.
    return "bf16" if device.type == "cuda" else "no"


def set_threads(threads: int | None, device: torch.device) -> int:
    """Intra-op threads; default 1 on CPU. On a shared CPU (load above the core count) two threads
    make every op wait for a descheduled straggler: small convolutions ran 5-10x slower than with one."""
    if threads is None and device.type == "cpu":
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so a wall-clock interval covers the GPU work it launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_format(device: torch.device) -> torch.memory_format:
    # NHWC convolutions are the fast path for bf16 tensor cores; on CPU NCHW is the default kernel.
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


# ---- timing ------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of ``fn()``, synchronising the device before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def interleaved(cases: dict[str, Callable[[], int]], *, rounds: int,
                device: torch.device) -> dict[str, list[float]]:
    """Items/s of each case per round; each ``fn()`` does its work and returns the items done.

    Cases alternate within every round and the starting case rotates between rounds, so a slow
    spell on a shared machine lands on all cases alike and ratios are measured side by side.
    """
    names = list(cases)
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds, items = timed(cases[name], device)
            rates[name].append(items / max(seconds, 1e-12))
    return rates


def summary(values: Sequence[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "rounds": [float(v) for v in values]}


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> dict[str, Any]:
    """Median of per-round ratios: each round's pair ran back to back, so drift cancels."""
    return summary([a / b for a, b in zip(num, den, strict=True)])


def linear_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, float | None]:
    """Least-squares ``y = intercept + slope * x`` with R²."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(set(xs.tolist())) < 2:  # one size measured (smoke tests): no line to fit
        return {"slope": None, "intercept": None, "r2": None}
    slope, intercept = np.polyfit(xs, ys, 1)
    resid = ys - (intercept + slope * xs)
    total = float(((ys - ys.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / total if total > 0 else 1.0
    return {"slope": float(slope), "intercept": float(intercept), "r2": r2}


# ---- profiling ---------------------------------------------------------------------------------
def profile_top(fn: Callable[[], Any], *, top: int = 15) -> list[dict[str, Any]]:
    """cProfile ``fn()``; the ``top`` functions by own time (where the Python time goes)."""
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    for (path, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{_short(path)}:{line}({func})", "calls": int(ncalls),
                     "tottime_s": round(tottime, 4), "cumtime_s": round(cumtime, 4)})
    rows.sort(key=lambda r: -r["tottime_s"])
    return rows[:top]


def _short(path: str) -> str:
    for marker in ("site-packages/", str(REPO) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


# ---- machine info, JSON, tables ----------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info(device: torch.device) -> dict[str, Any]:
    import numcodecs
    import zarr

    cuda = device.type == "cuda"
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        # The load when the run started: on a shared machine it says how much of the CPU we had.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
        "numpy": np.__version__, "zarr": zarr.__version__, "numcodecs": numcodecs.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        **git_state(),
    }


def git_state() -> dict[str, Any]:
    """The commit measured and whether the measured code differs from it.

    A copy of the working tree sent to another machine names its commit in AEKT_GIT_COMMIT, and
    AEKT_GIT_CLEAN=1 when it was sent from a clean tree (bench/device_session.sh): the sender's
    word wins, because such a copy may hold no .git or a stale one (the GPU machine's did)."""
    commit = os.environ.get("AEKT_GIT_COMMIT") or None
    if commit is not None:
        return {"git_commit": commit,
                "code_modified_since_commit": False if os.environ.get("AEKT_GIT_CLEAN") == "1" else None}
    commit = _git("rev-parse", "--short", "HEAD")
    if commit is None:
        return {"git_commit": None, "code_modified_since_commit": None}
    # Uncommitted edits to the measured code mean the commit alone does not reproduce the numbers.
    dirty = modified_files("pipeline", "stages", "bench/*.py")
    return {"git_commit": commit, "code_modified_since_commit": bool(dirty)}


def modified_files(*paths: str) -> list[str] | None:
    """Files under ``paths`` that `git status` lists as changed or untracked; None without git."""
    out = _git("status", "--porcelain", "--", *paths)
    # "XY path" per line; _git strips the output, so the first line may have lost X's blank.
    return None if out is None else [line[2:].strip() for line in out.splitlines()]


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_result(payload: dict[str, Any], *, name: str, device: torch.device,
                 out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{device.type}.json"
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    return path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in text]
    return "\n".join(lines)


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"aekt bench {name}", description=description)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (GPU-scale defaults on cuda).")
    parser.add_argument("--precision", choices=("no", "bf16", "fp16"), default=None,
                        help="autocast dtype (default: bf16 on cuda, no on cpu).")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default 1 on cpu, torch's default on cuda).")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats; medians are reported.")
    parser.add_argument("--profile", action="store_true", help="add a cProfile top-N to the JSON.")
    parser.add_argument("--out-dir", type=Path, default=None, help=f"JSON folder (default {RESULTS_DIR}).")
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON.")
    return parser


def csv_ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def csv_strs(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def prepare_run(device: str, threads: int | None, precision: str | None) -> tuple[torch.device, str]:
    """The start of every benchmark's run(): the device, its thread count, and the precision."""
    dev = resolve_device(device)
    set_threads(threads, dev)
    return dev, precision or default_precision(dev)


def finish_cli(args: Any, payload: dict[str, Any], table: str, *, name: str) -> int:
    """The end of every benchmark's main(): print, write per the common flags, exit code 0."""
    finish(payload, table, name=name, device=resolve_device(args.device), out_dir=args.out_dir,
           write=not args.no_write)
    return 0


def finish(payload: dict[str, Any], table: str, *, name: str, device: torch.device,
           out_dir: Path | None, write: bool) -> Path | None:
    """Print the table and (unless told not to) write the JSON; returns its path."""
    print(table)
    if not write:
        return None
    path = write_result(payload, name=name, device=device, out_dir=out_dir)
    print(f"wrote {path}")
    return path
