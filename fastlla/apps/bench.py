"""``python -m fastlla bench``: the benchmark suite of ``bench/suite`` and its report.

Runs, each in its own pytest process (pytest-benchmark, raw JSON kept), within a time budget:

1. ``params``   — scaling in parameters (MLPs P = 10³…10⁷ and the digits CNN), every method;
2. ``params-no-native`` — the same ScaLLA cases with ``FASTLLA_DISABLE_NATIVE=1`` (read at import,
   hence a separate process): the pure-PyTorch reference ops;
3. ``fidelity`` — held-out kernel error versus wall-clock, fastlla defaults vs the authors' ScaLLA
   (``bench/suite/authors.py``, a faithful re-implementation);
4. ``data`` and ``features`` — fit time and memory versus N and versus M;

then gathers the op micro-benchmarks (``bench/bench_ops.py``'s latest results file, or a short
run of it) and writes ``bench/results/suite[-<mode>]/<date>-<device>.md`` with tables and PNG
plots, the raw JSON beside it in ``bench/results/suite[-<mode>]/<date>-<device>/`` (one current
report per benchmark; older runs live in git history).

The suite lives in the source tree (``bench/``), not in the installed package: run it from a
checkout. ``--quick`` fits in 10 minutes on 2 CPU cores; ``--full`` uses 100-step fits, larger
N and M, and 10-minute fidelity runs.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["CONFIGS", "device_name", "run_bench"]

GiB = 2**30
_ALL = ["scalla", "la-all-full", "exact", "la-all-kron", "la-all-diag", "la-ll-full", "ella"]
_MLPS = ["mlp-1e3", "mlp-1e4", "mlp-1e5", "mlp-1e6", "mlp-1e7"]

#: Sizes, iteration counts, caps and per-section budgets (seconds) of each mode.
CONFIGS: dict[str, dict[str, Any]] = {
    "smoke": {
        "threads": 2, "latency_seconds": 1.0,
        "caps": {"memory_bytes": 8 * GiB, "seconds": 60},
        "params": {"models": ["cnn", "mlp-1e3", "mlp-1e4"], "methods": _ALL, "iterations": 5,
                   "n_features": 32},
        "data": {"n": [500, 1000], "methods": ["scalla", "exact"], "iterations": 5,
                 "n_features": 32},
        "features": {"m": [16, 64], "iterations": 5},
        "fidelity": {"seconds": 5, "n_probe": 50, "n_features": 100, "batch_size": 64,
                     "points": 4},
        "budgets": {"params": 120, "params-no-native": 60, "fidelity": 60, "data": 60,
                    "features": 60},
    },
    "quick": {
        "threads": 2, "latency_seconds": 4.0,
        "caps": {"memory_bytes": 8 * GiB, "seconds": 90},
        # largest first, so the P = 10⁷ case runs whatever the load; ExactLLA and all/full at
        # P ≈ 10⁴ run on the CNN (same P) only
        "params": {"models": ["cnn", *reversed(_MLPS)], "methods": _ALL, "iterations": 20,
                   "n_features": 128, "skip": {"mlp-1e4": ["exact", "la-all-full"]},
                   "skip_no_native": ["mlp-1e7"]},
        "data": {"n": [1000, 4000, 16000], "methods": ["scalla", "la-all-kron", "exact"],
                 "iterations": 20, "n_features": 128},
        "features": {"m": [32, 128, 512], "iterations": 20},
        "fidelity": {"seconds": 50, "n_probe": 200, "n_features": 100, "batch_size": 64,
                     "points": 12},
        "budgets": {"params": 300, "params-no-native": 40, "fidelity": 110, "data": 25,
                    "features": 20},
    },
    "full": {
        "threads": 2, "latency_seconds": 10.0,
        "caps": {"memory_bytes": 8 * GiB, "seconds": 900},
        "params": {"models": ["cnn", "mlp-1e3", "mlp-1e4", "mlp-3e4", "mlp-1e5", "mlp-1e6",
                              "mlp-1e7"],
                   "methods": [*_ALL, "la-all-full-curvlinops", "la-all-kron-curvlinops",
                               "la-all-diag-curvlinops"],
                   "iterations": 100, "n_features": 128},
        "data": {"n": [1000, 4000, 16000, 64000], "methods": ["scalla", "exact", "la-all-kron"],
                 "iterations": 100, "n_features": 128},
        "features": {"m": [16, 32, 64, 128, 256, 512, 1024], "iterations": 100},
        "fidelity": {"seconds": 600, "n_probe": 200, "n_features": 100, "batch_size": 64,
                     "points": 25},
        "budgets": {"params": 3600, "params-no-native": 1200, "fidelity": 1300, "data": 1200,
                    "features": 900},
    },
}  # fmt: skip

#: (section, test file, extra pytest args, extra environment)
SECTIONS = [
    ("params", "test_params.py", [], {}),
    ("params-no-native", "test_params.py", ["-k", "scalla"], {"FASTLLA_DISABLE_NATIVE": "1"}),
    ("fidelity", "test_fidelity.py", [], {}),
    ("data", "test_data.py", [], {}),
    ("features", "test_features.py", [], {}),
]


def device_name(device: str = "cpu", threads: int = 2) -> str:
    """``cpu-<n>core`` or the CUDA device's name, lower-case, for result file names."""
    if device.startswith("cuda"):
        import torch

        return "gpu-" + torch.cuda.get_device_name().lower().replace("nvidia ", "").replace(" ", "-")
    return f"cpu-{threads}core"


def _root() -> Path:
    root = Path(__file__).resolve().parents[2]
    if not (root / "bench" / "suite").is_dir():
        raise FileNotFoundError(
            "fastlla: the benchmark suite lives in the source tree (bench/suite); run "
            "`python -m fastlla bench` from a checkout of fastlla"
        )
    return root


def run_bench(
    mode: str = "quick",
    time_budget: float | None = None,
    out: str | None = None,
    sections: list[str] | None = None,
    log=print,
) -> Path:
    """Run the suite in ``mode`` (``smoke``/``quick``/``full``) and write the report.

    ``time_budget`` (seconds) scales every section's budget to fit it (default: the mode's sum,
    540 s for quick). Returns the path of the markdown report.
    """
    root = _root()
    cfg = copy.deepcopy(CONFIGS[mode])
    total = sum(cfg["budgets"].values())
    if time_budget is not None:
        scale = float(time_budget) / (total + 60)  # ~60 s of process start-ups and the report
        cfg["budgets"] = {k: v * scale for k, v in cfg["budgets"].items()}
        fid = cfg["fidelity"]
        fid["seconds"] = max(5.0, min(fid["seconds"], (cfg["budgets"]["fidelity"] - 15) / 2.2))
    wanted = sections or [s[0] for s in SECTIONS]
    threads = int(cfg["threads"])
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    folder = "suite" + ("" if mode == "quick" else f"-{mode}")
    name = f"{stamp}-{device_name('cpu', threads)}"
    out_md = Path(out) if out else root / "bench" / "results" / folder / f"{name}.md"
    raw = out_md.with_suffix("")
    raw.mkdir(parents=True, exist_ok=True)
    for stale in raw.glob("*.json*"):
        stale.unlink()
    start = time.time()
    deadline = start + (time_budget if time_budget is not None else total + 60)
    meta = {
        "mode": mode, "config": cfg, "started": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0], "command": " ".join(sys.argv),
    }  # fmt: skip
    for section, test_file, args, env_extra in SECTIONS:
        if section not in wanted:
            continue
        if time.time() > deadline - 5:
            log(f"[bench] {section}: skipped, the time budget is spent")
            continue
        env = dict(os.environ, **env_extra)
        env.update(
            FASTLLA_BENCH_CONFIG=json.dumps(cfg), FASTLLA_BENCH_OUT=str(raw),
            FASTLLA_BENCH_DEADLINE=str(deadline), OMP_NUM_THREADS=str(threads),
            PYTHONWARNINGS="ignore",
        )  # fmt: skip
        cmd = [
            sys.executable, "-m", "pytest", str(root / "bench" / "suite" / test_file),
            "-q", "-p", "no:cacheprovider", "--benchmark-only", "--benchmark-disable-gc",
            f"--benchmark-json={raw / f'benchmark-{section}.json'}", "-o", "addopts=",
            "--rootdir", str(root / "bench" / "suite"), *args,
        ]  # fmt: skip
        t0 = time.time()
        log(f"[bench] {section} ...")
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        (raw / f"pytest-{section}.log").write_text(proc.stdout + proc.stderr)
        tail = (proc.stdout.strip().splitlines() or [""])[-1]
        log(f"[bench] {section}: {time.time() - t0:.0f} s — {tail}")
    meta["seconds"] = time.time() - start
    (raw / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    sys.path.insert(0, str(root / "bench"))
    import report  # bench/report.py

    path = report.write_report(raw, out_md, ops_source=_ops_results(root, raw, deadline, log))
    log(f"[bench] report: {path} ({time.time() - start:.0f} s in all)")
    return path


def _ops_results(root: Path, raw: Path, deadline: float, log) -> Path | None:
    """The latest ``bench/results/ops/*.md`` from bench/bench_ops.py, or a short fresh run."""
    found = sorted((root / "bench" / "results" / "ops").glob("*.md"))
    if found:
        return found[-1]
    if time.time() > deadline - 40:
        log("[bench] ops: no results file and no time left to run bench/bench_ops.py")
        return None
    target = raw / "ops.md"
    cmd = [sys.executable, str(root / "bench" / "bench_ops.py"), "--repeat", "5",
           "--markdown", str(target)]  # fmt: skip
    subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    return target if target.exists() else None
