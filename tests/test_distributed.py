"""Distributed ScaLLA on torch.distributed (gloo, 2 processes on CPU) against one process.

One ``mp.spawn`` of two ranks runs every scenario (process start-up dominates the cost) and
saves each rank's results; the tests compare them with fits in this process.
"""

from __future__ import annotations

import datetime
import os
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


def posterior_summary(la: fastlla.ScaLLA, x_test: torch.Tensor) -> dict:
    _, cov = la.predictive_distribution(x_test)
    return {
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


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert "crash" not in res, f"rank {r} crashed:\n{res['crash']}"
    return results


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def single_process_posterior(likelihood: str, X, y, x_test, **kw) -> dict:
    model = make_model()
    sigma = 0.5 if likelihood == "regression" else 1.0
    la = fastlla.ScaLLA(model, likelihood, surrogate=make_surrogate(model), sigma_noise=sigma)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=5), iterations=0, progress_bar=False)
    return posterior_summary(la, x_test)


def assert_same_posterior(got: dict, want: dict) -> None:
    assert got["n_data"] == want["n_data"]
    assert rel(got["H"], want["H"]) < 1e-12
    assert rel(got["cov"], want["cov"]) < 1e-10
    assert abs(float(got["marglik"] - want["marglik"])) < 1e-9 * abs(float(want["marglik"]))
    assert abs(got["delta"] - want["delta"]) < 1e-6 * want["delta"]


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_two_process_posterior_equals_one_process(ranks, likelihood):
    x_test = torch.randn(5, D, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    X, y = make_data(make_model(), likelihood)
    want = single_process_posterior(likelihood, X, y, x_test)
    for res in ranks:  # every rank holds the full-data posterior
        assert_same_posterior(res[f"posterior/{likelihood}"], want)
    # and the ranks agree bit for bit
    key = f"posterior/{likelihood}"
    assert torch.equal(ranks[0][key]["H"], ranks[1][key]["H"])


def test_distributed_sampler_counts_every_point_once(ranks):
    x_test = torch.randn(5, D, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    X, y = make_data(make_model(), "classification")
    want = single_process_posterior("classification", X[:-1], y[:-1], x_test)
    for res in ranks:
        assert_same_posterior(res["posterior/sampler"], want)


def test_distributed_update_equals_one_process_fit(ranks):
    x_test = torch.randn(5, D, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    X, y = make_data(make_model(), "classification")
    want = single_process_posterior("classification", X, y, x_test)
    for res in ranks:
        got = res["update"]
        assert got["n_data"] == want["n_data"]
        assert rel(got["H"], want["H"]) < 1e-12
        assert rel(got["cov"], want["cov"]) < 1e-10


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
