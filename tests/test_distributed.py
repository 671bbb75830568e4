"""Distributed ScaLLA on torch.distributed (gloo, 2 processes on CPU).

Two ``mp.spawn`` runs of two ranks (process start-up dominates the cost) save each rank's
results: one runs the fits, whose posteriors the tests compare with an oracle formed here from
the surrogate's explicit features of all the data; the other runs faults on one rank under a
short process-group timeout (a hang fails fast with a gloo timeout instead of the agreed error).
"""

from __future__ import annotations

import datetime
import math
import os
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import fastlla
from fastlla import distributed

WORLD = 2
DTYPE = torch.float64
N, D, C, M = 48, 4, 3, 6
TRAIN_STEPS, BATCH = 60, 8
TIMEOUT = 300  # seconds; generous for a loaded CI machine (a dead peer is detected at once)
# Faults must be agreed on at once; a rank left waiting in a collective times out after this
# (short, but long enough for a fit's start-up between two collectives on a loaded machine).
FAULT_TIMEOUT = 60
RTOL = 1e-10  # float64 sums over N·C terms and a 6×6 solve (tests/testing.py's tolerance)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 12), nn.Tanh(), nn.Linear(12, C)).to(DTYPE)


def make_data(model: nn.Module, likelihood: str):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, D, generator=g, dtype=DTYPE)
    with torch.no_grad():
        f = model(X)
    if likelihood == "classification":
        return X, f.argmax(-1)
    return X, f + 0.3 * torch.randn(N, C, generator=g, dtype=DTYPE)


def make_surrogate(model: nn.Module) -> nn.Module:
    """A fixed (untrained) surrogate: identical on every process by construction."""
    torch.manual_seed(7)
    from fastlla.surrogate import default_surrogate

    n_params = sum(p.numel() for p in model.parameters())
    return default_surrogate(model, M, C, n_params)


class Counting(torch.utils.data.Dataset):
    """A map-style dataset that counts the items read and can fail on one of them."""

    def __init__(self, X, y, nan_at=None, raise_at=None):
        self.X, self.y, self.nan_at, self.raise_at, self.reads = X, y, nan_at, raise_at, 0

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i):
        self.reads += 1
        if i == self.raise_at:
            raise OSError(f"cannot read item {i}")
        x = self.X[i].clone()
        if i == self.nan_at:
            x[0] = float("nan")
        return x, self.y[i]


def posterior_summary(la: fastlla.ScaLLA, x_test: torch.Tensor) -> dict:
    _, cov = la.predictive_distribution(x_test)
    return {
        "delta0": la.prior_precision,
        "H": la.posterior.H.clone(),
        "cov": cov,
        "marglik": la.log_marginal_likelihood(),
        "n_data": la.n_data,
        "delta": la.optimize_prior_precision("marglik"),
    }


def fit_kernel(la: fastlla.ScaLLA, loader) -> fastlla.ScaLLA:
    return la.fit(loader, iterations=TRAIN_STEPS, n_projections=4, lr=3e-3, progress_bar=False)


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=TIMEOUT),
    )  # fmt: skip
    torch.set_num_threads(1)
    results: dict = {}
    x_test = torch.randn(5, D, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    try:
        # (a) posterior with fixed surrogate weights: unsharded loaders and DistributedSampler
        for likelihood in ("classification", "regression"):
            model = make_model()
            X, y = make_data(model, likelihood)
            sigma = 0.5 if likelihood == "regression" else 1.0
            la = fastlla.ScaLLA(
                model, likelihood, surrogate=make_surrogate(model), sigma_noise=sigma
            )
            la.fit(DataLoader(TensorDataset(X, y), batch_size=5), iterations=0, progress_bar=False)
            results[f"posterior/{likelihood}"] = posterior_summary(la, x_test)
        model = make_model()
        X, y = make_data(model, "classification")
        dataset = TensorDataset(X[:-1], y[:-1])  # 47 points: the sampler pads one shard
        sampler = DistributedSampler(dataset, shuffle=True, seed=0)
        la = fastlla.ScaLLA(model, "classification", surrogate=make_surrogate(model))
        la.fit(DataLoader(dataset, batch_size=5, sampler=sampler), iterations=0, progress_bar=False)
        results["posterior/sampler"] = posterior_summary(la, x_test)
        # an unsharded, shuffled (seeded) DataLoader: each rank reads only its share of the items
        dataset = Counting(X, y)
        loader = DataLoader(
            dataset, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(4)
        )
        la = fastlla.ScaLLA(model, "classification", surrogate=make_surrogate(model))
        la.fit(loader, iterations=0, progress_bar=False)
        results["posterior/shuffled"] = posterior_summary(la, x_test)
        results["reads/posterior"] = dataset.reads
        dataset = Counting(X, y)
        la = fastlla.ScaLLA(model, "classification", n_features=M)
        la.fit(DataLoader(dataset, batch_size=5), iterations=2, n_projections=2,
               progress_bar=False)  # fmt: skip
        results["reads/train"] = dataset.reads
        # a list of batches (no indices to skip: every rank keeps every other batch)
        la = fastlla.ScaLLA(model, "classification", surrogate=make_surrogate(model))
        la.fit(list(zip(X.split(5), y.split(5))), iterations=0, progress_bar=False)
        results["posterior/list"] = posterior_summary(la, x_test)
        # the same batch on both ranks: only the ranks' tangents differ (rank-aware seeds)
        la = fastlla.ScaLLA(model, "classification", surrogate=make_surrogate(model), seed=0)
        la.fit([(X[:8], y[:8])] * WORLD, iterations=1, n_projections=2, augment=None,
               progress_bar=False)  # fmt: skip
        results["seeds/loss"] = la.history[0]["loss"]
        # streaming update, distributed
        la = fastlla.ScaLLA(model, "classification", surrogate=make_surrogate(model))
        la.fit(DataLoader(TensorDataset(X[:30], y[:30]), batch_size=5), iterations=0,
               progress_bar=False)  # fmt: skip
        la.update(DataLoader(TensorDataset(X[30:], y[30:]), batch_size=4))
        results["update"] = posterior_summary(la, x_test)

        # (b) surrogate training: batch BATCH per rank, gradients averaged
        model = make_model()
        X, y = make_data(model, "regression")
        la = fastlla.ScaLLA(model, "regression", n_features=M, seed=0)
        fit_kernel(la, DataLoader(TensorDataset(X, y), batch_size=BATCH))
        results["train"] = {
            "surrogate": {k: v.clone() for k, v in la.surrogate.state_dict().items()},
            "residual_head": None if getattr(la, "residual_head", None) is None else {
                k: v.clone() for k, v in la.residual_head.state_dict().items()
            },
            "H": la.posterior.H.clone(),
            "fidelity": la.kernel_fidelity(x_test, method="exact"),
            "first_loss": la.history[0]["loss"],
        }

        # (c) mismatched weights → the same clear error on every rank
        model = make_model()
        if rank == 1:
            with torch.no_grad():
                model[0].weight[0, 0] += 1e-3
        X, y = make_data(make_model(), "classification")
        la = fastlla.ScaLLA(model, "classification", n_features=M)
        try:
            la.fit(DataLoader(TensorDataset(X, y), batch_size=8), iterations=3, progress_bar=False)
            results["mismatch"] = None
        except distributed.DistributedMismatchError as err:
            results["mismatch"] = str(err)
        # mismatched settings (number of steps)
        la = fastlla.ScaLLA(make_model(), "classification", n_features=M)
        try:
            la.fit(DataLoader(TensorDataset(X, y), batch_size=8), iterations=2 + rank,
                   progress_bar=False)  # fmt: skip
            results["steps"] = None
        except distributed.DistributedMismatchError as err:
            results["steps"] = str(err)
        # a bad update on one rank is refused on every rank, the posterior untouched
        la = fastlla.ScaLLA(make_model(), "classification", surrogate=make_surrogate(make_model()))
        la.fit(DataLoader(TensorDataset(X, y), batch_size=8), iterations=0, progress_bar=False)
        H0 = la.posterior.H.clone()
        bad_y = y[:16].clone()
        bad_y[9] = C  # label out of range, in the batch rank 1 reads
        try:
            la.update(DataLoader(TensorDataset(X[:16], bad_y), batch_size=8))
            results["bad_update"] = None
        except (ValueError, distributed.DistributedMismatchError) as err:
            results["bad_update"] = (type(err).__name__, str(err), torch.equal(H0, la.posterior.H))
        dist.barrier()
        # a rank that dies: the survivor's next collective errors instead of hanging
        if rank == 1:
            torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
            os._exit(0)
        la = fastlla.ScaLLA(make_model(), "classification", n_features=M)
        try:
            la.fit(DataLoader(TensorDataset(X, y), batch_size=8), iterations=2, progress_bar=False)
            results["dead_rank"] = None
        except Exception as err:  # noqa: BLE001 - any error is the point, a hang is not
            results["dead_rank"] = f"{type(err).__name__}: {err}"
    except Exception:  # noqa: BLE001
        results["crash"] = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _spawn(worker, out) -> list[dict]:
    """Run ``worker`` on WORLD processes and return each rank's results (none may crash)."""
    mp.spawn(worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert "crash" not in res, f"rank {r} crashed:\n{res['crash']}"
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return _spawn(_worker, tmp_path_factory.mktemp("dist"))


class NaNAbove(nn.Module):
    """The identity, but NaN for inputs whose first feature exceeds 100: finite inputs that
    give NaN outputs and JVPs."""

    def forward(self, x):
        return x * torch.where(x[:, :1] > 100, float("nan"), 1.0).to(x)


# Each fault strikes rank 1 only (its first own batch is batch 1, items 5..9 at batch size 5):
# (scenario, the failing rank's exception, words of its message).
FAULTS = [
    ("start", "ValueError", "inputs of train_loader"),  # its first DistributedSampler batch
    ("training", "ValueError", "inputs of train_loader"),
    ("posterior", "ValueError", "inputs of train_loader"),
    ("jvp", "ValueError", "NaN"),
    ("callback", "RuntimeError", "callback failed on purpose"),
    ("loader", "OSError", "cannot read item 6"),
]


def _fault_worker(rank: int, store_path: str, out_dir: str) -> None:
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=FAULT_TIMEOUT),
    )  # fmt: skip
    torch.set_num_threads(1)
    results: dict = {}
    X, y = make_data(make_model(), "classification")

    def fail_on_rank_1(step, la):
        if rank == 1:
            raise RuntimeError("callback failed on purpose")

    try:
        for name, _, _ in FAULTS:
            model, kw = make_model(), {"iterations": 0}
            dataset = Counting(X, y, nan_at=5)
            loader = DataLoader(dataset, batch_size=5)
            if name == "start":
                dataset = Counting(X, y, nan_at=1)  # rank 1's shard is items 1, 3, 5, …
                sampler = DistributedSampler(dataset, shuffle=False)
                loader = DataLoader(dataset, batch_size=5, sampler=sampler)
            elif name == "training":
                kw = {"iterations": 3}
            elif name == "jvp":
                Xj = X.clone()
                Xj[5, 0] = 200.0
                model = nn.Sequential(NaNAbove(), *make_model())
                loader, kw = DataLoader(TensorDataset(Xj, y), batch_size=5), {"iterations": 2}
            elif name == "callback":
                loader = DataLoader(TensorDataset(X, y), batch_size=5)
                kw = {"iterations": 2, "callback": fail_on_rank_1, "callback_every": 1}
            elif name == "loader":
                loader = DataLoader(Counting(X, y, raise_at=6), batch_size=5)
            la = fastlla.ScaLLA(model, "classification", n_features=M)
            start = time.perf_counter()
            try:
                la.fit(loader, n_projections=2, progress_bar=False, **kw)
                results[name] = None
            except Exception as err:  # noqa: BLE001 - what each rank raises is the point
                results[name] = {
                    "type": type(err).__name__,
                    "message": str(err),
                    "notes": list(getattr(err, "__notes__", [])),
                    "seconds": time.perf_counter() - start,
                }
        # the process group is still usable after the agreed failures
        la = fastlla.ScaLLA(make_model(), "classification", n_features=M)
        la.fit(DataLoader(TensorDataset(X, y), batch_size=5), iterations=2, n_projections=2,
               progress_bar=False)  # fmt: skip
        results["after"] = la.n_data
    except Exception:  # noqa: BLE001
        results["crash"] = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    return _spawn(_fault_worker, tmp_path_factory.mktemp("faults"))


@pytest.mark.parametrize("scenario, error, cause", FAULTS, ids=[f[0] for f in FAULTS])
def test_a_fault_on_one_rank_raises_on_every_rank(faults, scenario, error, cause):
    """Every rank raises promptly (no collective left waiting for the timeout): the failed rank
    its own error, the other an error naming the failed rank and the cause."""
    failed, other = faults[1][scenario], faults[0][scenario]
    assert failed is not None and other is not None
    assert failed["type"] == error and cause in failed["message"], failed
    if sys.version_info >= (3, 11):
        assert any("rank 1 of 2" in note for note in failed["notes"]), failed
    assert other["type"] == "DistributedMismatchError", other
    assert "failed on rank 1 of 2" in other["message"] and cause in other["message"], other
    assert f"{error}: " in other["message"]
    for res in (failed, other):
        assert res["seconds"] < FAULT_TIMEOUT  # not a timeout


def test_process_group_usable_after_faults(faults):
    assert [res["after"] for res in faults] == [N, N]


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def oracle(likelihood: str, X, y, x_test) -> dict:
    """The feature-space posterior of all the data, from the surrogate's explicit features.

    ``H = Σ_n Φ_n Λ_n Φ_nᵀ`` (``Λ_n = diag p − p pᵀ``, or ``I`` for regression, whose ``1/σ²``
    is applied where ``H`` is used), the evidence ``log p(D|θ*) − ½δ‖θ*‖² − ½ log det(I + sH/δ)``
    and the predictive covariance ``Φ*ᵀ (sH + δI)⁻¹ Φ*`` (``s = 1/σ²`` or 1), in float64.
    """
    model = make_model()
    surrogate = make_surrogate(model)
    regression = likelihood == "regression"
    sigma = 0.5 if regression else 1.0
    with torch.no_grad():
        f, phi, phi_test = model(X), surrogate(X), surrogate(x_test)
    if regression:
        lam = torch.eye(C, dtype=DTYPE).expand(len(X), C, C)
        loglik = -0.5 * float((y - f).square().sum()) / sigma**2 - X.shape[0] * C * math.log(
            sigma * math.sqrt(2 * math.pi)
        )
    else:
        p = torch.softmax(f, -1)
        lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        loglik = float(torch.log_softmax(f, -1).gather(1, y[:, None]).sum())
    H = torch.einsum("nmc,ncd,nkd->mk", phi, lam, phi)
    scale = 1 / sigma**2
    theta2 = float(sum(q.detach().square().sum() for q in model.parameters()))

    def evidence(delta: float) -> float:
        logdet = torch.linalg.slogdet(torch.eye(M, dtype=DTYPE) + scale * H / delta)[1]
        return loglik - 0.5 * delta * theta2 - 0.5 * float(logdet)

    def cov(delta: float) -> torch.Tensor:
        A = scale * H + delta * torch.eye(M, dtype=DTYPE)
        return torch.einsum("bmc,mk,bkd->bcd", phi_test, torch.linalg.inv(A), phi_test)

    return {"H": H, "evidence": evidence, "cov": cov, "n_data": X.shape[0]}


def assert_oracle_posterior(got: dict, want: dict) -> None:
    assert got["n_data"] == want["n_data"]
    assert rel(got["H"], want["H"]) < RTOL
    assert rel(got["cov"], want["cov"](got["delta0"])) < RTOL
    evidence = want["evidence"](got["delta0"])
    assert abs(float(got["marglik"]) - evidence) < RTOL * abs(evidence)
    # the optimised prior precision maximises the oracle's evidence
    best = want["evidence"](got["delta"])
    for factor in (0.97, 1.03):
        assert best >= want["evidence"](got["delta"] * factor) - RTOL * abs(best)


X_TEST = torch.randn(5, D, generator=torch.Generator().manual_seed(3), dtype=DTYPE)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_two_process_posterior_equals_oracle(ranks, likelihood):
    X, y = make_data(make_model(), likelihood)
    want = oracle(likelihood, X, y, X_TEST)
    for res in ranks:  # every rank holds the full-data posterior
        assert_oracle_posterior(res[f"posterior/{likelihood}"], want)
    # and the ranks agree bit for bit
    key = f"posterior/{likelihood}"
    assert torch.equal(ranks[0][key]["H"], ranks[1][key]["H"])


def test_distributed_sampler_counts_every_point_once(ranks):
    X, y = make_data(make_model(), "classification")
    want = oracle("classification", X[:-1], y[:-1], X_TEST)
    for res in ranks:
        assert_oracle_posterior(res["posterior/sampler"], want)


@pytest.mark.parametrize("loader", ["shuffled", "list"])
def test_unsharded_loaders_count_every_point_once(ranks, loader):
    """A seeded shuffled DataLoader (strided batch sampler) and a list of batches."""
    X, y = make_data(make_model(), "classification")
    want = oracle("classification", X, y, X_TEST)
    for res in ranks:
        assert_oracle_posterior(res[f"posterior/{loader}"], want)


def test_each_rank_reads_only_its_share(ranks):
    """An unsharded DataLoader: rank r loads its batches r, r + W, … (+ the first batch at fit
    start, + one batch per training step, + its share once more to distil the gated surrogate
    after training), never the other ranks' items."""
    sizes = [len(b) for b in torch.arange(N).split(5)]
    for r, res in enumerate(ranks):
        share = sum(sizes[r::WORLD])
        assert share + 5 >= res["reads/posterior"] >= share
        assert 2 * share + 5 + 2 * 5 >= res["reads/train"] >= share


def test_ranks_draw_different_tangents(ranks):
    """Both ranks train on the same batch from the same surrogate: only their tangents differ,
    so equal losses would mean every rank drew the same tangents (the ranks' S projections
    would then be one rank's S, repeated)."""
    losses = [res["seeds/loss"] for res in ranks]
    assert math.isfinite(losses[0]) and math.isfinite(losses[1])
    assert losses[0] != losses[1]


def test_distributed_update_equals_oracle(ranks):
    X, y = make_data(make_model(), "classification")
    want = oracle("classification", X, y, X_TEST)
    for res in ranks:
        assert_oracle_posterior(res["update"], want)


def test_two_process_training_converges_like_twice_the_batch(ranks):
    """2 ranks × batch B (gradients averaged) against 1 process × batch 2B, same steps."""
    x_test = torch.randn(5, D, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    trained = [r["train"] for r in ranks]
    # identical surrogate and posterior on every rank
    for part in ("surrogate", "residual_head"):
        for k, v in (trained[0][part] or {}).items():
            assert torch.equal(v, trained[1][part][k]), (part, k)
    assert torch.equal(trained[0]["H"], trained[1]["H"])

    model = make_model()
    X, y = make_data(model, "regression")
    la = fastlla.ScaLLA(model, "regression", n_features=M, seed=0)
    fit_kernel(la, DataLoader(TensorDataset(X, y), batch_size=WORLD * BATCH))
    one = la.kernel_fidelity(x_test, method="exact")
    untrained = fastlla.ScaLLA(make_model(), "regression", n_features=M, seed=0)
    untrained.fit(DataLoader(TensorDataset(X, y), batch_size=WORLD * BATCH), iterations=0,
                  progress_bar=False)  # fmt: skip
    start = untrained.kernel_fidelity(x_test, method="exact")
    two = trained[0]["fidelity"]
    assert two < 0.6 * start and one < 0.6 * start  # both learned the kernel
    assert abs(two - one) < 0.35 * one, (two, one, start)


def test_mismatched_weights_raise_on_every_rank(ranks):
    for res in ranks:
        assert res["mismatch"] is not None
        assert "weights differ across ranks" in res["mismatch"]
        assert res["steps"] is not None and "settings differ" in res["steps"]
        assert "iterations" in res["steps"]


def test_bad_update_on_one_rank_is_refused_everywhere(ranks):
    names = []
    for res in ranks:
        name, message, untouched = res["bad_update"]
        assert untouched
        names.append(name)
    assert "ValueError" in names and "DistributedMismatchError" in names


def test_dead_rank_gives_an_error_not_a_hang(ranks):
    assert ranks[0]["dead_rank"] is not None


@pytest.mark.parametrize(
    "options",
    [
        {"batch_size": None},
        {"batch_size": 3, "drop_last": True},
        {"batch_size": 3, "num_workers": 2},
        {"batch_size": 2, "shuffle": True, "seed": 0},
    ],
    ids=["unbatched", "drop_last", "workers", "shuffled"],
)
def test_strided_loader_yields_the_loaders_own_batches(options):
    """The strided copy of a DataLoader (no process group needed) yields batches r, r + W, … of
    what the loader itself yields, and says how many."""
    options = dict(options)
    seed = options.pop("seed", None)
    generator = None if seed is None else torch.Generator()
    loader = DataLoader(TensorDataset(torch.arange(11.0)), generator=generator, **options)
    for rank in range(WORLD):
        if generator is not None:
            generator.manual_seed(seed)
        everything = [b[0].tolist() for b in loader]
        if generator is not None:
            generator.manual_seed(seed)
        group = distributed.Group(rank, WORLD, torch.device("cpu"))
        strided = distributed._strided_loader(loader, group)
        got = [b[0].tolist() for b in strided]
        assert got == everything[rank::WORLD]
        assert len(strided) == len(got)
