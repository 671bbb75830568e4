"""Shared pieces of the benchmark suite: models of a given size, the methods under test behind
one interface, predicted memory needs, latency timing and the result rows.

Every method is wrapped as a :class:`Method`: ``fit(loader)``, ``predict_cov(x)`` (mean and
``C×C`` covariance) and ``predict_probit(x)`` (class probabilities), ``state_bytes()`` and
``predicted_bytes(...)`` (what it would need, so a run that cannot fit is *reported* with its
need instead of crashing the machine). Each method gets its own deep copy of the network
(BackPACK leaves hooks on the modules it extends).
"""

from __future__ import annotations

import copy
import ctypes
import gc
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
from torch import nn

import fastlla
from fastlla import _ops
from fastlla.apps.measure import measure
from fastlla.network_head import penultimate

FLOAT = 4  # bytes per float32

# --------------------------------------------------------------------------- configuration


def config() -> dict[str, Any]:
    """The run's configuration, written by :mod:`fastlla.apps.bench` into ``FASTLLA_BENCH_CONFIG``."""
    from fastlla.apps.bench import CONFIGS

    raw = os.environ.get("FASTLLA_BENCH_CONFIG")
    return json.loads(raw) if raw else dict(CONFIGS["smoke"])


def out_dir() -> str:
    path = os.environ.get("FASTLLA_BENCH_OUT", os.path.join("bench", "results", "_scratch"))
    os.makedirs(path, exist_ok=True)
    return path


def record(row: dict[str, Any]) -> None:
    """Append one result row to ``rows.jsonl`` (the report's source of truth)."""
    row = {"native": bool(_ops.NATIVE_LOADED), "threads": torch.get_num_threads(), **row}
    with open(os.path.join(out_dir(), "rows.jsonl"), "a") as f:
        f.write(json.dumps(row, default=float) + "\n")


class Budget:
    """Wall-clock budget per section of the suite (seconds from the section's first test)."""

    def __init__(self, budgets: dict[str, float], deadline: float | None):
        self.budgets, self.deadline, self.started = budgets, deadline, {}

    def remaining(self, section: str) -> float:
        now = time.time()
        start = self.started.setdefault(section, now)
        left = self.budgets.get(section, math.inf) - (now - start)
        if self.deadline is not None:
            left = min(left, self.deadline - now)
        return left


# --------------------------------------------------------------------------- memory and time


def release_memory() -> None:
    """Return freed heap to the OS so the next RSS high-water mark starts from the live level."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def measured(fn: Callable[[], Any]) -> tuple[Any, float, int]:
    """``fn()`` with its wall time and real peak memory (RSS above the level at entry)."""
    release_memory()
    with measure() as m:
        out = fn()
    return out, m.seconds, m.peak_bytes


def latencies(fns: dict[str, Callable[[], Any]], min_rounds: int = 5, max_seconds: float = 10.0):
    """Median seconds of each function, calls interleaved round-robin (fair on a noisy machine).

    A function slower than ``max_seconds / min_rounds`` on its first (warm-up) call is timed
    from that call alone.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    slow = set()
    with torch.no_grad():
        for k, fn in fns.items():  # warm-up, timed
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if dt > max_seconds / min_rounds:
                slow.add(k)
                times[k].append(dt)
        fast = [k for k in fns if k not in slow]
        start = time.perf_counter()
        rounds = 0
        while fast and (rounds < min_rounds or time.perf_counter() - start < 0.5):
            for k in fast:
                t0 = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - t0)
            rounds += 1
            if time.perf_counter() - start > max_seconds:
                break
    return {k: statistics.median(v) for k, v in times.items()}


def tensor_bytes(obj: Any, seen: set | None = None) -> int:
    """Bytes of every tensor in a (nested) state dict, each storage counted once."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.numel(), obj.dtype)
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


_RATE: list[float] = []


def gemm_rate() -> float:
    """Float32 matmul rate of this machine (flop/s, best of 3 at 1024²): the time model's unit."""
    if not _RATE:
        a = torch.randn(1024, 1024)
        a @ a
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t0)
        _RATE.append(2 * 1024**3 / best)
    return _RATE[0]


# --------------------------------------------------------------------------- models


def mlp_width(n_params: float, in_features: int = 64, n_classes: int = 10) -> int:
    """Width ``h`` of a ``64 → h → h → 10`` MLP with about ``n_params`` parameters."""
    b = in_features + 2 + n_classes  # P = h² + (in + 2 + C)·h + C
    return max(1, round((-b + math.sqrt(b * b + 4 * (n_params - n_classes))) / 2))


def make_mlp(n_params: float, seed: int = 0) -> nn.Sequential:
    """A flat ``nn.Sequential`` MLP on flat digits with two hidden ReLU layers of equal width."""
    h = mlp_width(n_params)
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10)
    ).eval()


def make_cnn(seed: int = 0) -> nn.Sequential:
    """The digits CNN (MAP weights of ``bench/fidelity``'s cache, else trained) as a flat
    ``nn.Sequential`` — the same function, in the layout BackPACK needs."""
    from fastlla.apps.models import DigitsCNN, train_map

    cnn = DigitsCNN(10)
    cache = os.path.join(os.path.dirname(__file__), "..", "fidelity", f"map_cnn_seed{seed}.pt")
    if os.path.exists(cache):
        cnn.load_state_dict(torch.load(cache))
    else:
        ds = digits(flat=False)
        train_map(cnn, ds.loader("train", 64, shuffle=True, seed=seed), seed=seed)
    return nn.Sequential(*copy.deepcopy(cnn.trunk), copy.deepcopy(cnn.head)).eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def digits(flat: bool, seed: int = 0):
    from fastlla.apps.data import load_digits_split

    return load_digits_split(seed, flat=flat)


def replicate(x: torch.Tensor, y: torch.Tensor, n: int, seed: int = 0):
    """``n`` inputs: the data repeated, with small pixel noise on the copies (data scaling)."""
    g = torch.Generator().manual_seed(seed)
    reps = math.ceil(n / x.shape[0])
    xs = x.repeat(reps, *([1] * (x.dim() - 1)))[:n].clone()
    ys = y.repeat(reps)[:n].clone()
    xs[x.shape[0]:] += 0.05 * torch.randn(xs[x.shape[0]:].shape, generator=g)
    return xs, ys


def loader(x, y, batch_size: int = 64, shuffle: bool = False, seed: int = 0):
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen)


def layer_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(fan-in incl. bias, fan-out) of each Linear/Conv layer (for Kronecker-factor sizes)."""
    out = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            out.append((m.in_features + 1, m.out_features))
        elif isinstance(m, nn.Conv2d):
            k = m.in_channels * math.prod(m.kernel_size)
            out.append((k + 1, m.out_channels))
    return out


def last_width(model: nn.Module) -> int:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].in_features


# --------------------------------------------------------------------------- methods


@dataclass
class Setting:
    """What a method is fitted on."""

    model: nn.Module
    n_data: int
    n_classes: int = 10
    batch_size: int = 64
    test_batch: int = 256
    n_features: int = 128
    iterations: int = 100
    n_projections: int = 8
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def P(self) -> int:
        return n_params(self.model)


class Method:
    name = "?"
    family = "?"

    def __init__(self, s: Setting):
        self.s = s
        self.model = copy.deepcopy(s.model).eval()
        self.la: Any = None

    def available(self) -> str | None:
        """``None``, or why the method cannot run in this environment."""
        return None

    def predicted_bytes(self) -> int:
        raise NotImplementedError

    #: fraction of the matmul rate the method's work runs at (Jacobians and small ops are slower)
    efficiency = 0.3

    def predicted_flops(self) -> float:
        """Flops of the fit plus one predictive call for the test batch (the time model)."""
        return 0.0

    #: fixed seconds per input whose Jacobian the method forms (Python/autograd overhead)
    per_jacobian = 0.0

    def predicted_seconds(self) -> float:
        s = self.s
        overhead = self.per_jacobian * (s.n_data + s.test_batch)
        return overhead + self.predicted_flops() / (self.efficiency * gemm_rate())

    def fit(self, train) -> None:
        raise NotImplementedError

    def predict_cov(self, x):
        raise NotImplementedError

    def predict_probit(self, x):
        raise NotImplementedError

    def state_bytes(self) -> dict[str, int]:
        return {"total": tensor_bytes(self.la.state_dict())}

    def info(self) -> dict[str, Any]:
        return {}


class ScaLLAMethod(Method):
    family = "fastlla"

    @property
    def name(self):  # the same test, run with the compiled library disabled, is the reference
        return "fastlla ScaLLA" + ("" if _ops.NATIVE_LOADED else " (no native ops)")

    def predicted_bytes(self):
        s = self.s
        # tangents (S·P), the surrogate's trunk copy with grad and two Adam moments (~4P),
        # forward-mode activations of S tangents, the M×M posterior
        head = last_width(s.model) * s.n_features * s.n_classes
        return FLOAT * ((s.n_projections + 5) * (s.P + head) + s.n_features**2)

    def predicted_flops(self):
        s = self.s  # S JVPs (~3 forwards each) and the surrogate's forward+backward per step
        return s.iterations * s.batch_size * 2 * s.P * (3 * s.n_projections + 3) + s.n_data * 2 * s.P

    def fit(self, train):
        self.la = fastlla.ScaLLA(self.model, "classification", n_features=self.s.n_features)
        self.la.fit(
            train, iterations=self.s.iterations, n_projections=self.s.n_projections,
            progress_bar=False,
        )  # fmt: skip

    def predict_cov(self, x):
        return self.la.predictive_distribution(x)

    def predict_probit(self, x):
        return self.la(x, link_approx="probit")

    def state_bytes(self):
        state = self.la.state_dict()
        # the learned networks (surrogate, and the residual-variance head when present)
        sur = sum(tensor_bytes(state[k]) for k in ("surrogate", "residual_head") if k in state)
        total = tensor_bytes(state)
        return {"total": total, "surrogate": sur, "beyond_surrogate": total - sur}

    def info(self):
        h = self.la.history
        steps = [b["seconds"] - a["seconds"] for a, b in zip(h, h[1:])]
        return {
            "seconds_per_step": statistics.median(steps) if steps else math.nan,
            "kernel_seconds": h[-1]["seconds"] if h else 0.0,
            "n_features_total": self.la.n_features,
            "iterations": self.s.iterations,
        }


class ExactMethod(Method):
    name = "fastlla ExactLLA"
    family = "fastlla"
    per_jacobian = 4e-3

    def form(self):
        return "weight" if self.s.P <= self.s.n_data * self.s.n_classes else "function"

    def predicted_bytes(self):
        s, P, NC = self.s, self.s.P, self.s.n_data * self.s.n_classes
        jac = FLOAT * 2 * 32 * s.n_classes * P  # a chunk of Jacobians and its softmax product
        test = FLOAT * 2 * s.test_batch * s.n_classes * P  # J(x*) of the test batch
        if self.form() == "weight":
            return FLOAT * 3 * P * P + jac + test  # G, its eigen/Cholesky factor
        return FLOAT * (NC * P + 3 * NC * NC) + jac + test + FLOAT * s.test_batch * s.n_classes * NC

    def predicted_flops(self):
        s, P, C, N = self.s, self.s.P, self.s.n_classes, self.s.n_data
        NC, B = N * C, s.test_batch
        jac = 4 * C * P * (N + B)
        if self.form() == "weight":
            return jac + 2 * N * C * P * P + P**3 / 3 + B * C * P * P
        return jac + 2 * NC * NC * P + NC**3 / 3 + 2 * B * C * NC * P + B * C * NC * NC

    def fit(self, train):
        self.la = fastlla.ExactLLA(self.model, "classification", form="auto")
        self.la.fit(train)

    def predict_cov(self, x):
        return self.la.predictive_distribution(x)

    def predict_probit(self, x):
        return self.la(x, link_approx="probit")

    def info(self):
        return {"form": getattr(self.la, "fitted_form", self.form())}


def _laplace_import() -> str | None:
    try:
        import laplace  # noqa: F401
    except Exception as err:  # not installed, or a broken torchvision beside it
        return f"laplace-torch not importable ({type(err).__name__}: {str(err)[:80]})"
    return None


class LaplaceTorchMethod(Method):
    """``laplace.Laplace(model, "classification", subset_of_weights, hessian_structure)``."""

    family = "laplace-torch"
    per_jacobian = 1e-3

    def __init__(self, s: Setting, subset: str, structure: str, backend: str = "backpack"):
        super().__init__(s)
        self.subset, self.structure, self.backend = subset, structure, backend
        self.name = f"laplace-torch {subset}/{structure}" + (
            "" if backend == "backpack" else f" ({backend})"
        )

    def available(self):
        return _laplace_import()

    def backend_cls(self):
        from laplace.curvature import BackPackGGN, CurvlinopsGGN

        return {"backpack": BackPackGGN, "curvlinops": CurvlinopsGGN}[self.backend]

    def predicted_bytes(self):
        s, P, C = self.s, self.s.P, self.s.n_classes
        test = FLOAT * 2 * s.test_batch * C * P  # glm predictive: the test batch's Jacobians
        batch = FLOAT * 2 * s.batch_size * C * P  # per-batch Jacobians / per-sample grads
        if self.subset == "last_layer":
            d = (last_width(s.model) + 1) * C
            return FLOAT * 4 * d * d + FLOAT * s.test_batch * C * d * 2
        if self.structure == "full":
            return FLOAT * 3 * P * P + batch + test
        if self.structure == "kron":
            facs = sum(a * a + b * b for a, b in layer_shapes(s.model))
            return FLOAT * 4 * facs + batch + 2 * test
        return FLOAT * 4 * P + batch + test  # diag

    def predicted_flops(self):
        s, P, C, N, B = self.s, self.s.P, self.s.n_classes, self.s.n_data, self.s.test_batch
        jac = 4 * C * P * (N + B)
        if self.subset == "last_layer":
            d = (last_width(s.model) + 1) * C
            return 2 * N * C * d * d + d**3 + 2 * B * C * d * d + 2 * (N + B) * P
        if self.structure == "full":
            return jac + 2 * N * C * P * P + P**3 + 2 * B * C * P * P
        if self.structure == "kron":
            shapes = layer_shapes(s.model)
            eig = sum(10 * (a**3 + b**3) for a, b in shapes)
            return jac + eig + sum(2 * N * (a * a + b * b) for a, b in shapes) + sum(
                2 * B * C * a * b * (a + b) for a, b in shapes
            )
        return jac + 2 * (N + B) * C * P  # diag

    def fit(self, train):
        from laplace import Laplace

        self.la = Laplace(
            self.model, "classification", subset_of_weights=self.subset,
            hessian_structure=self.structure, backend=self.backend_cls(),
        )  # fmt: skip
        self.la.fit(train, progress_bar=False) if _accepts(self.la.fit, "progress_bar") else self.la.fit(train)

    def predict_cov(self, x):
        return self.la._glm_predictive_distribution(x)

    def predict_probit(self, x):
        return self.la(x, pred_type="glm", link_approx="probit")

    def state_bytes(self):
        try:
            return {"total": tensor_bytes(self.la.state_dict())}
        except Exception:  # noqa: BLE001 - some estimators have no state_dict
            return {"total": tensor_bytes(vars(self.la))}

    def info(self):
        return {"backend": self.backend}


class ELLAMethod(LaplaceTorchMethod):
    """laplace-torch's ELLA (Nyström features from Jacobians of a subsample)."""

    efficiency = 0.1  # measured: its Jacobian products run far below the matmul rate


    def __init__(self, s: Setting):
        super().__init__(s, "all", "gp")
        self.name = "laplace-torch ELLA"
        self.k = s.n_features
        self.subsample = max(2 * s.n_features, 256)

    def available(self):
        why = _laplace_import()
        if why:
            return why
        import laplace

        return None if hasattr(laplace, "ELLA") else "this laplace-torch has no ELLA"

    def predicted_bytes(self):
        s, P, C = self.s, self.s.P, self.s.n_classes
        return FLOAT * (2 * self.subsample * C * P + 2 * self.k * P + 2 * s.test_batch * C * P)

    def predicted_flops(self):
        s, P, C, N, B = self.s, self.s.P, self.s.n_classes, self.s.n_data, self.s.test_batch
        return (4 * C * P * (self.subsample + N + B) + 2 * self.subsample**2 * P
                + 2 * (N + B) * C * P * self.k)  # fmt: skip

    def fit(self, train):
        from laplace import Laplace

        self.la = Laplace(
            self.model, "classification", subset_of_weights="all", hessian_structure="gp",
            functional_approximation="nystrom", subsample_size=self.subsample,
            n_eigenvalues=self.k,
        )  # fmt: skip
        self.la.fit(train)

    def predict_cov(self, x):
        return self.la._glm_predictive_distribution(x)

    def predict_probit(self, x):
        return self.la(x, pred_type="gp", link_approx="probit")

    def info(self):
        return {"subsample_size": self.subsample, "n_eigenvalues": self.k}


def _accepts(fn, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def methods(s: Setting, names: list[str]) -> list[Method]:
    """The methods called ``names`` (see :data:`METHOD_NAMES`) for the setting ``s``."""
    out = []
    for n in names:
        if n == "scalla":
            out.append(ScaLLAMethod(s))
        elif n == "exact":
            out.append(ExactMethod(s))
        elif n == "ella":
            out.append(ELLAMethod(s))
        elif n.startswith("la-"):
            _, subset, structure, *backend = n.split("-")
            subset = {"all": "all", "ll": "last_layer"}[subset]
            out.append(LaplaceTorchMethod(s, subset, structure, *(backend or ["backpack"])))
        else:
            raise ValueError(f"unknown method {n!r}")
    return out


#: method keys used on the command line and in the config
METHOD_NAMES = ["scalla", "exact", "la-all-full", "la-all-kron", "la-all-diag", "la-ll-full", "ella"]


# --------------------------------------------------------------------------- one case


def run_case(benchmark, budget, section, s: Setting, method: Method, row: dict) -> None:
    """Fit and time one method on one setting, or record why it was not run."""
    cfg = config()
    caps = cfg["caps"]
    row.update(method=method.name, family=method.family, P=s.P, N=s.n_data,
               gemm_gflops=gemm_rate() / 1e9)
    why = method.available()
    if why:
        record({**row, "status": "unavailable", "reason": why})
        pytest.skip(why)
    need = method.predicted_bytes()
    row["predicted_bytes"] = need
    if need > caps["memory_bytes"]:
        record({**row, "status": "over memory cap", "cap_bytes": caps["memory_bytes"]})
        pytest.skip(f"predicted {need / 2**30:.1f} GiB > cap")
    t = method.predicted_seconds()
    row["predicted_seconds"] = t
    if not isinstance(method, ScaLLAMethod) and t > caps["seconds"]:
        record({**row, "status": "over time cap", "cap_seconds": caps["seconds"]})
        pytest.skip(f"predicted {t:.0f} s > time cap")
    left = budget.remaining(section)
    if left <= 0 or (t > left and not isinstance(method, ScaLLAMethod)):
        record({**row, "status": "out of suite budget", "budget_left": left})
        pytest.skip("suite time budget exhausted")
    train = loader(s.extra["x"], s.extra["y"], s.batch_size)
    _, fit_s, peak = benchmark.pedantic(
        lambda: measured(lambda: method.fit(train)), rounds=1, iterations=1
    )
    x = s.extra["x_test"]
    fns = {"map": lambda: method.model(x), "cov": lambda: method.predict_cov(x),
           "probit": lambda: method.predict_probit(x)}  # fmt: skip
    if isinstance(method, ScaLLAMethod):  # where the predictive's time goes
        la = method.la
        fns["surrogate"] = lambda: la.surrogate(x)  # g(x) as a module of its own
        learned = getattr(la.surrogate, "learned", None)
        if learned is not None:  # only its learned network (ψ(x) comes from the MAP pass)
            fns["learned"] = lambda: learned(x)
        with torch.no_grad():
            feats = la._features(x)
        if getattr(la, "residual_head", None) is not None:
            psi = penultimate(la.model, la.residual_head.head_name, x, la.residual_head.has_bias)
            fns["residual_head"] = lambda: la.residual_head(x, psi)
        fns["cov_op"] = lambda: la.posterior.covariance(
            feats.phi, float(la.prior_precision), la.data_scale, feats.kron
        )
    release_memory()
    slow = cfg.get("latency_seconds", 5.0)
    with measure() as pm:
        t0 = time.perf_counter()
        with torch.no_grad():
            method.predict_cov(x)  # warm-up (one-time factorisations), timed
        first = time.perf_counter() - t0
        if first > slow:  # slow predictive: one more, steady-state call; probit not timed apart
            fns.pop("probit")
            t0 = time.perf_counter()
            with torch.no_grad():
                method.predict_cov(x)
            lat = {"cov": time.perf_counter() - t0}
            lat.update(latencies({k: v for k, v in fns.items() if k != "cov"}, max_seconds=slow))
        else:
            lat = latencies(fns, max_seconds=slow)
    lat["cov_first_call"] = first
    state = method.state_bytes()
    row.update(
        status="ok", fit_seconds=fit_s, fit_peak_bytes=peak, predict_peak_bytes=pm.peak_bytes,
        state_bytes=state["total"], state=state, latency=lat,
        cov_over_map=lat["cov"] / lat["map"],
        probit_over_map=lat["probit"] / lat["map"] if "probit" in lat else None,
        **method.info(),
    )  # fmt: skip
    if "learned" in lat:
        row["cov_over_map_plus_learned"] = lat["cov"] / (lat["map"] + lat["learned"])
    if "surrogate" in lat:
        row["cov_over_map_plus_surrogate"] = lat["cov"] / (lat["map"] + lat["surrogate"])
        row["probit_over_map_plus_surrogate"] = lat["probit"] / (lat["map"] + lat["surrogate"])
    benchmark.extra_info.update({k: v for k, v in row.items() if k != "state"})
    record(row)
    method.la = None
    release_memory()
