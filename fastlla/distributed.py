"""Distributed fitting on ``torch.distributed``: sharded data, DDP-style surrogate training,
all-reduced posterior.

When a process group is initialised (torchrun, ``mp.spawn``, any launcher) with more than one
rank, :meth:`fastlla.ScaLLA.fit` (and :meth:`~fastlla.ScaLLA.update`) run data-parallel with no
change to the call:

* **Checks at fit start** (collective; every rank raises the same
  :class:`DistributedMismatchError`):
  the network's weights agree on every rank (checksums all-gathered), and so do the fit's settings
  (iterations — hence the number of steps —, projections, learning rate, seed, likelihood,
  ``M``, ``C``, ``P``) and the number of batches of each loader. The surrogate's parameters and
  buffers are then broadcast from rank 0, so every rank starts from the same surrogate.
* **Data sharding.** A ``DataLoader`` whose sampler is a
  :class:`~torch.utils.data.distributed.DistributedSampler` is used as it is for training
  (``set_epoch`` is called at each pass); for the posterior pass it is replaced by an exact
  partition of its dataset (indices ``rank, rank + W, …``, same batch size and collate function),
  because ``DistributedSampler`` pads the last shard with repeated samples that would count twice
  in ``H``. Any other loader (or list of batches) is **unsharded**: every rank passes the same
  loader, which must yield the same batches in the same order on every rank (no shuffling, or a
  seeded one), and rank ``r`` keeps batches ``r, r + W, r + 2W, …``. For a plain
  ``DataLoader`` over a map-style dataset only those batches are loaded (its batch sampler is
  strided, the other ranks' indices are never read), so each rank reads its share of the dataset
  plus the first batch, which every rank reads at fit start to check the ranks agree. Any other
  iterable (an ``IterableDataset``, a ``DataLoader`` subclass, a generator) is read in full by
  every rank, which drops the batches that are not its own; shard such data with a
  ``DistributedSampler`` instead.
* **Surrogate training.** Each rank draws its own tangents from a rank-aware seed
  (:func:`rank_seed`; rank 0 keeps the estimator's seed, so a one-process fit is unchanged),
  and after each backward pass the surrogate's gradients are averaged over the ranks in one
  all-reduce — the gradient of the mean of the ranks' losses, as DDP computes it. The first
  step's scale calibration sums its statistics over ranks too.
* **Posterior.** Each rank accumulates ``H`` and the log-likelihood statistics over its shard;
  ``H``, the statistics and the data count are then all-reduced (summed), so every rank ends with
  the identical posterior and hyper-parameters.

Faults: the ranks agree on failure. An exception on one rank — a NaN in its shard, a loader
that raises, a NaN in the network's JVPs, a failing callback — is carried to every rank at the
next collective of the fit (fit start, each training step's gradient all-reduce, the posterior's
all-reduce): the rank that failed raises its own exception (with a note naming its rank), every
other rank raises :class:`DistributedMismatchError` naming the failed rank and its error, and the
process group stays usable. A rank that dies makes the others' next collective fail; pass
``timeout=`` to ``init_process_group`` so a silent one gives an error after that time instead of
a hang (gloo honours it directly; for NCCL keep ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` at its
default so a timed out collective aborts the process).

Multi-GPU (NCCL) with torchrun, one process per GPU::

    torchrun --standalone --nproc_per_node=4 fit.py

    # fit.py
    import datetime, os, torch, torch.distributed as dist
    import fastlla
    dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=5))
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    model = load_pretrained().cuda()                   # identical weights on every rank
    sampler = torch.utils.data.DistributedSampler(train_set, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(train_set, batch_size=64, sampler=sampler)
    la = fastlla.ScaLLA(model, "classification", seed=0)
    la.fit(loader, iterations=2000)                    # batch 64 per GPU, gradients averaged
    la.optimize_prior_precision()                      # identical on every rank
    if dist.get_rank() == 0:
        torch.save(la.state_dict(), "scalla.pt")
    dist.destroy_process_group()

Multi-node: ``torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d
--rdzv_endpoint=HOST:29400 fit.py``. On CPUs use the ``"gloo"`` backend.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DistributedMismatchError",
    "Fault",
    "Group",
    "current_group",
    "rank_seed",
    "shard",
    "check_fit_start",
    "average_gradients",
    "sum_over_ranks",
    "all_reduce_posterior",
    "gather_columns",
    "agree",
]

# Rank r > 0 draws its tangents from seed + r·SEED_STRIDE (the tangents hash the low 32 bits).
SEED_STRIDE = 0x632BE5AB


class DistributedMismatchError(RuntimeError):
    """The ranks of a distributed fit disagree (weights, settings, data sizes) or one failed."""


@dataclass(frozen=True)
class Group:
    """The default process group as fastlla uses it."""

    rank: int
    world_size: int
    device: torch.device
    """Where collective buffers live: the current CUDA device for NCCL, else the CPU."""

    def to_comm(self, t: Tensor) -> Tensor:
        return t.to(self.device)


def current_group() -> Group | None:
    """The initialised default process group with more than one rank, else ``None``."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world <= 1:
        return None
    backend = str(dist.get_backend()).lower()
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if "nccl" in backend
        else torch.device("cpu")
    )
    return Group(dist.get_rank(), world, device)


def rank_seed(seed: int) -> int:
    """The tangent seed of this rank: ``seed`` on rank 0 (and without a process group)."""
    group = current_group()
    if group is None or group.rank == 0:
        return int(seed)
    return (int(seed) + group.rank * SEED_STRIDE) % (2**62)


# --------------------------------------------------------------------------- data sharding
def _sampler_of(loader: Any) -> Any:
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if not isinstance(sampler, torch.utils.data.DistributedSampler) and batch_sampler is not None:
        sampler = getattr(batch_sampler, "sampler", sampler)
    return sampler


def is_presharded(loader: Any) -> bool:
    """Whether ``loader`` already shards through a ``DistributedSampler``."""
    return isinstance(_sampler_of(loader), torch.utils.data.DistributedSampler)


class _BatchStride:
    """Items ``rank, rank + W, …`` of an iterable: the batches of an unsharded loader (which
    every rank iterates), or the index lists of its batch sampler (nothing else is loaded)."""

    def __init__(self, loader: Iterable, rank: int, world_size: int):
        self.loader, self.rank, self.world_size = loader, rank, world_size

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(self.loader, self.rank, None, self.world_size)

    def __len__(self) -> int:
        n = len(self.loader)  # type: ignore[arg-type]
        return max(0, math.ceil((n - self.rank) / self.world_size))


class _EpochSetter:
    """A ``DistributedSampler`` loader that advances the sampler's epoch at each pass."""

    def __init__(self, loader: Any):
        self.loader, self.epoch = loader, 0

    def __iter__(self) -> Iterator[Any]:
        _sampler_of(self.loader).set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def _exact_partition(loader: Any, group: Group) -> Any:
    """The loader's dataset split without padding: indices ``rank, rank + W, …``."""
    dataset = getattr(loader, "dataset", None)
    batch_size = getattr(loader, "batch_size", None)
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        n = None
    if n is None or batch_size is None:
        return loader  # a custom batch sampler: trust it (padding, if any, is the user's choice)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=range(group.rank, n, group.world_size),
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )


# The DataLoader settings a strided copy keeps (those this torch version has).
_LOADER_OPTIONS = (
    "num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn",
    "multiprocessing_context", "generator", "prefetch_factor", "persistent_workers",
    "pin_memory_device", "in_order",
)  # fmt: skip


def _strided_loader(loader: Any, group: Group) -> Any:
    """A plain map-style ``DataLoader`` that loads only batches ``rank, rank + W, …``, or ``None``.

    Its batch sampler (or, without automatic batching, its sampler) is strided, so the other
    ranks' indices are skipped before anything is read; the batches are those the loader itself
    would yield (same sampler and generator, collate function, workers).
    """
    data = torch.utils.data
    if type(loader) is not data.DataLoader or isinstance(loader.dataset, data.IterableDataset):
        return None  # a subclass may iterate its own way; a stream has no indices to skip
    options = {k: getattr(loader, k) for k in _LOADER_OPTIONS if hasattr(loader, k)}
    stride = (group.rank, group.world_size)
    if loader.batch_sampler is not None:
        which = {"batch_sampler": _BatchStride(loader.batch_sampler, *stride)}
    else:
        which = {"batch_size": None, "sampler": _BatchStride(loader.sampler, *stride)}
    return data.DataLoader(loader.dataset, **which, **options)


def shard(loader: Iterable | None, stage: str = "train") -> Iterable | None:
    """This rank's share of ``loader`` (the loader itself without a process group).

    ``stage="train"`` (surrogate training, any shard with equal step counts will do) or
    ``"posterior"`` (every data point exactly once over all ranks).
    """
    group = current_group()
    if group is None or loader is None:
        return loader
    if is_presharded(loader):
        return _exact_partition(loader, group) if stage == "posterior" else _EpochSetter(loader)
    strided = _strided_loader(loader, group)
    return strided if strided is not None else _BatchStride(loader, group.rank, group.world_size)


# --------------------------------------------------------------------------- agreement
def _gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _describe(error: BaseException | None) -> str | None:
    return None if error is None else f"{type(error).__name__}: {error}"


def _raise_for(messages: list[str | None], error: BaseException | None, what: str) -> None:
    """Raise on every rank if any rank's message is set (the ranks' messages, all-gathered).

    A failed rank re-raises its own ``error`` with a note naming its rank; the others raise
    :class:`DistributedMismatchError` naming the failed rank(s) and their errors.
    """
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if not failed:
        return
    world = len(messages)
    if error is not None:
        note = f"fastlla: {what} failed on rank {dist.get_rank()} of {world}; every rank raised"
        if hasattr(error, "add_note"):  # Python ≥ 3.11
            error.add_note(note)
        raise error
    ranks = ", ".join(str(r) for r, _ in failed)
    shown = "; ".join(f"rank {r}: {m}" for r, m in failed[:3])
    raise DistributedMismatchError(
        f"fastlla: {what} failed on rank{'s' if len(failed) > 1 else ''} {ranks} of {world} "
        f"({shown})"
    )


def _raise_agreed(error: BaseException | None, what: str) -> None:
    """Collective, after an all-reduced failure flag came back set: every rank raises."""
    _raise_for(_gather(_describe(error)), error, what)


def agree(error: BaseException | None, what: str) -> None:
    """Collective: raise on every rank if ``error`` is set on any (no-op without a group).

    One all-reduced flag when every rank is healthy; the messages are all-gathered only on
    failure. The rank that failed re-raises its own error; the others raise
    :class:`DistributedMismatchError` naming it.
    """
    group = current_group()
    if group is None:
        if error is not None:
            raise error
        return
    flag = group.to_comm(torch.tensor([0.0 if error is None else 1.0]))
    dist.all_reduce(flag)
    if float(flag[0]) > 0:
        _raise_agreed(error, what)


class Fault:
    """This rank's exception in the local work between two collectives of a distributed fit.

    Under a process group, ``with fault:`` keeps the first :class:`Exception` raised in its
    block in ``fault.error`` instead of raising it, so that this rank still reaches the next
    collective, which carries the failure to every rank and raises it there on all of them
    (:meth:`agree`, :func:`average_gradients`, :func:`all_reduce_posterior`,
    :func:`check_fit_start`). Code after a block must use nothing the block computed unless
    ``fault.ok``. Without a process group the exception propagates at once.
    """

    def __init__(self, what: str):
        self.what = what
        self.error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def __enter__(self) -> Fault:
        return self

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> bool:
        if not isinstance(error, Exception) or current_group() is None:
            return False
        if self.error is None:
            self.error = error
        return True

    def agree(self) -> None:
        """Collective: raise on every rank if this fault is set on any."""
        agree(self.error, self.what)


def _weight_checksum(module: nn.Module) -> list[tuple[str, float, float, float]]:
    """Per parameter: (name, Σθ, Σ|θ|, Σθ·cos(i)) in float64 — order and sign sensitive."""
    out = []
    for name, p in module.named_parameters():
        t = p.detach().reshape(-1).double()
        w = torch.cos(torch.arange(t.numel(), device=t.device, dtype=torch.float64))
        out.append((name, float(t.sum()), float(t.abs().sum()), float((t * w).sum())))
    return out


def _loader_length(loader: Iterable | None) -> int | None:
    if loader is None:
        return None
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _batch_checksum(x: Any) -> float:
    tensors = [x] if isinstance(x, Tensor) else list(x.values() if isinstance(x, dict) else x)
    return float(sum(t.detach().double().sum() for t in tensors if isinstance(t, Tensor)))


def check_fit_start(
    estimator: Any,
    train_loader: Iterable,
    context_loader: Iterable | None,
    first_inputs: Any,
    settings: dict[str, Any],
    error: BaseException | None = None,
) -> None:
    """Collective checks at the start of a distributed fit; broadcast the surrogate.

    Every rank raises the same :class:`DistributedMismatchError` when the ranks disagree on the
    network's weights, on ``settings`` (which fix the number of steps), on the loaders' lengths,
    or — for unsharded loaders — on the first batch. ``error``: this rank's failure in the fit's
    preparation (the other arguments are then not read); every rank raises it, as in
    :func:`agree`. Without a process group ``error`` is raised, else nothing happens.
    """
    group = current_group()
    if group is None:
        if error is not None:
            raise error
        return
    if error is not None:  # the others gather their checks below: answer in the same collective
        everyone = _gather({"error": _describe(error)})
        _raise_for([d.get("error") for d in everyone], error, "fit")
    presharded = is_presharded(train_loader)
    settings = dict(settings)
    for name in ("seed", "likelihood", "n_features", "n_outputs", "prior_precision", "sigma_noise"):
        value = getattr(estimator, name, None)
        value = value.tolist() if isinstance(value, torch.Tensor) else value  # plain, comparable
        settings[name] = getattr(value, "value", value)
    settings["n_params"] = estimator.network.n_params
    config = getattr(estimator, "_train_config", None) or {}
    settings.update({k: config[k] for k in ("schedule", "ema") if k in config})
    mine = {
        "settings": settings,
        "weights": _weight_checksum(estimator.model),
        "train batches": _loader_length(train_loader),
        "context batches": _loader_length(context_loader),
        "train sharding": "DistributedSampler" if presharded else "by batch index",
        "first batch": None if presharded else _batch_checksum(first_inputs),
    }
    everyone = _gather(mine)
    _raise_for([d.get("error") for d in everyone], None, "fit")
    problems = []
    for key in mine:
        values = [d[key] for d in everyone]
        if key == "weights":
            bad = [r for r, v in enumerate(values) if not _same_weights(v, values[0])]
        else:
            bad = [r for r, v in enumerate(values) if v != values[0]]
        if bad:
            if key == "weights":
                shown = f"ranks {bad} differ from rank 0"
            elif key == "settings":
                shown = "; ".join(
                    f"{name}: rank 0 {values[0].get(name)!r}, rank {r} {values[r].get(name)!r}"
                    for r in bad[:3]
                    for name in sorted(set(values[0]) | set(values[r]))
                    if values[0].get(name) != values[r].get(name)
                )
            else:
                shown = "; ".join(f"rank {r}: {values[r]!r}" for r in [0, *bad[:3]])
            problems.append(f"{key} differ across ranks ({shown})")
    length = mine["train batches"]
    if not presharded and length is not None and length < group.world_size:
        problems.append(
            f"train_loader has {length} batches, fewer than the {group.world_size} ranks that "
            "share it by batch index"
        )
    if problems:
        hint = (
            " — every rank must load the same pre-trained weights, call fit with the same "
            "arguments, and pass loaders of equal length (the same unsharded loader, or a "
            "DataLoader with a DistributedSampler)"
        )
        raise DistributedMismatchError(
            f"fastlla: distributed fit on {group.world_size} ranks: " + "; ".join(problems) + hint
        )
    broadcast_module(estimator.surrogate)


def _same_weights(a: list, b: list) -> bool:
    if [r[0] for r in a] != [r[0] for r in b]:
        return False
    for (_, s1, n1, c1), (_, s2, n2, c2) in zip(a, b):
        tol = 1e-9 * max(n1, n2, 1e-300)
        if abs(n1 - n2) > tol or abs(s1 - s2) > tol or abs(c1 - c2) > tol:
            return False
    return True


# --------------------------------------------------------------------------- collectives
def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers into ``module`` on every rank."""
    group = current_group()
    if group is None:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            buf = group.to_comm(t.detach().clone())
            dist.broadcast(buf, src=0)
            t.copy_(buf.to(t.device))


def average_gradients(
    params: Iterable[Tensor], error: BaseException | None = None, what: str = "surrogate training"
) -> None:
    """Average ``.grad`` over the ranks in one all-reduce (missing gradients count as zero).

    The all-reduce carries a failure flag: ``error`` (this rank's failure in the step, whose
    gradients are then not read) raises on every rank, as in :func:`agree`.
    """
    group = current_group()
    if group is None:
        if error is not None:
            raise error
        return
    params = list(params)
    if error is None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    else:
        grads = [torch.zeros_like(p) for p in params]
    flag = torch.tensor(
        [0.0 if error is None else 1.0],
        dtype=grads[0].dtype if grads else torch.float32,
        device=grads[0].device if grads else None,
    )
    flat = group.to_comm(torch.cat([*(g.reshape(-1) for g in grads), flag]))
    dist.all_reduce(flat)
    if float(flat[-1]) > 0:
        _raise_agreed(error, what)
    flat /= group.world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.device).clone()
        offset += n


def sum_over_ranks(*values: Tensor) -> tuple[Tensor, ...]:
    """Scalars summed over the ranks (returned unchanged without a process group)."""
    group = current_group()
    if group is None:
        return values
    flat = group.to_comm(torch.stack([v.detach().double().reshape(()) for v in values]))
    dist.all_reduce(flat)
    return tuple(flat[i].to(device=v.device, dtype=v.dtype) for i, v in enumerate(values))


def all_reduce_posterior(
    estimator: Any, H: Tensor, error: BaseException | None = None, what: str = "fit (posterior)"
) -> None:
    """Sum ``H`` (in place), the log-likelihood statistic and ``n_data`` over the ranks.

    The first all-reduce carries a failure flag: ``error`` (this rank's failure in accumulating
    its shard) raises on every rank, as in :func:`agree`, before anything is changed.
    """
    group = current_group()
    if group is None:
        if error is not None:
            raise error
        return
    mine = [0.0, 0.0, 1.0] if error is not None else [estimator._loglik_stat, estimator.n_data, 0]
    stats = group.to_comm(torch.tensor(mine, dtype=torch.float64))
    dist.all_reduce(stats)
    if float(stats[2]) > 0:
        _raise_agreed(error, what)
    buf = group.to_comm(H)
    dist.all_reduce(buf)
    H.copy_(buf)
    estimator._loglik_stat = float(stats[0])
    estimator.n_data = int(round(float(stats[1])))


def gather_columns(W: Tensor) -> Tensor:
    """The column blocks ``W_r`` (M, k_r) of every rank side by side, ``(M, Σ k_r)``.

    Blocks are zero-padded to the largest ``k_r`` for the all-gather; zero columns are no-ops in
    a Cholesky update and in ``WWᵀ``, so they are kept only where removing them costs a copy.
    """
    group = current_group()
    if group is None:
        return W
    k = torch.tensor([W.shape[1]], device=group.device)
    sizes = [torch.zeros_like(k) for _ in range(group.world_size)]
    dist.all_gather(sizes, k)
    k_max = int(max(int(s) for s in sizes))
    padded = torch.zeros(W.shape[0], k_max, dtype=W.dtype, device=group.device)
    padded[:, : W.shape[1]] = W
    blocks = [torch.empty_like(padded) for _ in range(group.world_size)]
    dist.all_gather(blocks, padded.contiguous())
    return torch.cat([b[:, : int(s)] for b, s in zip(blocks, sizes)], dim=1).to(W.device)
