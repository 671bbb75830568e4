"""The authors' ScaLLA, re-implemented faithfully: the baseline every fastlla claim is measured
against.

Source: ``bayesipy/laplace/scalla/src.py`` (class ``ScaLLA``) of ``github.com/Ludvins/BayesiPy``,
with the surrogate and the settings of their FMNIST experiment, ``examples/FMNIST/
unified_bayesipy.py`` (``--method alla``) and its recorded ``results/alla*/hparams.json``. The
paper: Ortega, Rodríguez-Santana, Hernández-Lobato, "Scalable Linearized Laplace Approximation
via Surrogate Neural Kernel", arXiv 2601.21835 (ESANN 2026). Their code is not copied; this is a
re-implementation of what it computes, step by step.

What they do
------------
* **Surrogate** (:func:`authors_surrogate`, their ``ConvHead``): the network's architecture,
  *freshly initialised* (PyTorch's default init — not the network's weights), with its output
  layer replaced by ``Linear(h, M·C)``; the output reshaped to ``(B, M, C)`` (row-major: unit
  ``m·C + c``) and multiplied by the constant ``√(P/M)``, ``P`` the number of the network's
  parameters (all of them). No calibration of the scale.
* **Kernel matching** (:meth:`AuthorsScaLLA.kernel_steps`): Adam (constant lr) on the
  surrogate's parameters. Each step takes the next batch of the training loader (a shuffled
  ``DataLoader``: without replacement, a fresh permutation each epoch; the loader is restarted
  when exhausted), concatenates the next batch of the context loader when one is given, draws
  *one* Rademacher tangent ``v`` over all the network's parameters (``sign(U(0,1) − ½)``), forms
  the JVP ``z = J(x) v`` (forward-mode AD, network in eval mode, surrogate in train mode), the
  materialised ``K = z zᵀ`` and ``Q = Φ Φᵀ`` as ``B×B×C×C`` tensors, and minimises
  ``mean((K − Q)²)`` (``+ weight_decay · ‖surrogate params‖₂`` when ``weight_decay`` is not
  ``None`` — their FMNIST run passes ``0.0``, so the norm is computed and multiplied by zero).
  ``zero_crossed_variances``: the training×context blocks of ``K`` are set to zero.
* **Posterior** (:meth:`AuthorsScaLLA.fit`): one pass over the training loader, surrogate still
  in train mode: ``H = Σ Φ Λ Φᵀ`` with ``Λ = diag(p) − p pᵀ`` (classification) or ``Σ Φ Φᵀ``
  (regression); precision ``H/σ² + diag(δ)`` (``σ = 1`` for classification), its Cholesky
  scale with ``10⁻⁶ I`` added; prior ``δ = 1`` unless ``optimize_hyper_parameters``: Adam on
  ``log δ`` (and ``log σ``, regression) of their marginal likelihood ``log p(D|θ*) − ½(log det P
  − Σ log δ + δ‖θ*‖²)`` (``θ*`` the network's parameters; the log det in feature space).
* **Predictive** (:meth:`AuthorsScaLLA.forward`): the network's output and the ``N×N×C×C``
  covariance ``Φ(x)ᵀ Σ Φ(x')`` of the whole batch; their evaluation keeps its diagonal blocks
  (:meth:`AuthorsScaLLA.predictive_covariance`) and averages ``softmax`` over 2048 samples
  (:meth:`AuthorsScaLLA.predict_proba`).

Their FMNIST run (``hparams.json``): batch 5 for every loader (training, MNIST-train context,
test, KMNIST OOD), M = 100, lr 5e-5, 10⁶ iterations, weight decay 0.0, no hyper-parameter
optimisation, context loader always passed (``zero_crossed_variances`` false for ``alla``, true
for ``alla_zero_crossed_variances``). :data:`PUBLISHED_FMNIST` holds those settings and the
metrics they recorded (``results/*/summary.json``); we cannot run FMNIST here (no data set, no
network weights offline), so the numbers are quoted, not reproduced:

==============================  ======  ======  ======  ==========================
run (their FMNIST CNN)          ACC     NLL     ECE     OOD AUROC (KMNIST), entropy
                                                        / Gaussian entropy
==============================  ======  ======  ======  ==========================
MAP                             0.9101  0.2539  0.0102  0.773 / 0.5
ScaLLA (``alla``)               0.9103  0.2528  0.0078  0.789 / 0.785
ScaLLA, cross blocks zeroed     0.9099  0.2530  0.0084  0.821 / 0.983
last-layer LLA (kron)           0.9092  0.2714  0.0239  0.842 / 0.993
==============================  ======  ======  ======  ==========================

Deviations (none in the defaults changes what is computed; each with its reason)
--------------------------------------------------------------------------------
1. **Private RNG.** Their tangents draw from the global torch RNG and their surrogate is
   initialised from it. Here tangents come from the estimator's own generator (seeded with
   ``seed``, on the network's device) and :func:`authors_surrogate` initialises inside a fork of
   the global RNG seeded with ``seed``: same distributions, reproducible, and the caller's RNG
   state is left unchanged (a project rule).
2. **The user's module is left as it was.** They call ``model.eval()`` once and set
   ``requires_grad = True`` on every parameter for good. Here the network is put in eval mode
   for each call and restored afterwards, and the JVP uses detached dual parameters (forward-mode
   AD needs no ``requires_grad``): the same values, no lasting change.
3. **The training/context split point, an option.** They zero the cross blocks at
   ``B = len(batch) // 2``, right only when the two batches have equal size (always so in their
   runs: 60,000 / 5; not for a training set whose size is no multiple of 5, whose last batch per
   epoch is shorter). That stays the default, with a ``RuntimeWarning`` on each step where the
   sizes differ (the zeroed blocks are then not the training×context blocks);
   ``split_at_train_batch=True`` splits at the training batch's own size instead.
4. **Surrogate construction for any network.** Their ``ConvHead`` is written by hand for their
   CNN. :func:`authors_surrogate` builds the same thing for a given network: a deep copy, every
   module re-initialised with its own ``reset_parameters`` (an error if some parameter has none),
   and the output layer — found by running the network and verifying ``f = W φ + b``
   (:func:`fastlla.network_head.find_head`), not by name — replaced by ``Linear(h, M·C)``.
5. **Harness hooks.** :meth:`AuthorsScaLLA.fit` also takes ``callback``/``time_budget`` (for the
   fidelity benchmark: evaluation outside the timed steps, a wall-clock stop). Unset, the loop is
   theirs.
6. **Predictive options beyond theirs, off by default.** ``predictive_covariance(x,
   full_cross=False)`` computes only the ``B`` diagonal ``C×C`` blocks their evaluation keeps
   (the same numbers without the ``B²C²`` cross-covariance); ``predict_proba(x,
   as_published=False)`` samples ``f + L z`` instead of their metric's ``f + Lᵀ z`` (their
   einsum ``"sna,nab->snb"`` multiplies by the transpose of the Cholesky factor, so the samples'
   covariance is ``LᵀL``, not ``LLᵀ = Σ``; same trace and eigenvalues, other marginals).

Checked against their code: with their ``src.py`` loop, JVP, GGN pass and ``forward`` run
side by side (a local copy, not in this repository; same surrogate, same loaders, their global
RNG seeded as our generator), 500 steps on the digits CNN (1,077 training images, so short last
batches; 200 context images) give bitwise-identical losses, surrogate weights, ``H`` and
``N×N×C×C`` predictive covariance — without context, with context, and with the cross blocks
zeroed.

Reproduced as written, though questionable (not deviations, so flagged here):
``H`` is accumulated with the surrogate in train mode (batch-norm statistics, dropout active if
the architecture has them); the classification "log-likelihood" of the marginal likelihood sums
the *per-batch mean* cross-entropies (constant in ``δ``, so the optimised prior is unaffected,
only the reported value); their FMNIST OOD score takes the entropy of ``softmax`` of the
MC-averaged probabilities (:func:`published_entropy`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from fastlla.network_head import find_head

__all__ = [
    "PUBLISHED_FMNIST",
    "AuthorsScaLLA",
    "AuthorsSurrogate",
    "authors_fit",
    "authors_loader",
    "authors_surrogate",
    "published_entropy",
]

#: Their FMNIST ScaLLA run: settings (``examples/FMNIST/results/alla/hparams.json``) and recorded
#: metrics (``results/<run>/summary.json``) of ``github.com/Ludvins/BayesiPy``. OOD: KMNIST test.
# fmt: off
PUBLISHED_FMNIST: dict[str, Any] = {
    "settings": {"batch_size": 5, "n_features": 100, "lr": 5e-5, "iterations": 1_000_000,
                 "weight_decay": 0.0, "optimize_hyper_parameters": False,
                 "context": "MNIST train", "prior_precision": 1.0, "seed": 0},
    "metrics": {
        "map": {"ACC": 0.9101, "NLL": 0.2539, "ECE": 0.0102, "BRIER": 0.1313,
                "OOD_AUROC_Entropy": 0.7732, "OOD_AUROC_Entropy_Gaussian": 0.5},
        "alla": {"ACC": 0.9103, "NLL": 0.2528, "ECE": 0.0078, "BRIER": 0.1311,
                 "OOD_AUROC_Entropy": 0.7891, "OOD_AUROC_Entropy_Gaussian": 0.7846},
        "alla_zero_crossed_variances": {"ACC": 0.9099, "NLL": 0.2530, "ECE": 0.0084,
                                        "BRIER": 0.1311, "OOD_AUROC_Entropy": 0.8214,
                                        "OOD_AUROC_Entropy_Gaussian": 0.9827},
        "lla_last_layer_kron": {"ACC": 0.9092, "NLL": 0.2714, "ECE": 0.0239, "BRIER": 0.1367,
                                "OOD_AUROC_Entropy": 0.8415, "OOD_AUROC_Entropy_Gaussian": 0.9928},
    },
}
# fmt: on


# --------------------------------------------------------------------------- the surrogate


class AuthorsSurrogate(nn.Module):
    """``g(x) = √(P/M) · body(x).reshape(B, M, C)`` — their ``ConvHead``.

    ``body``: the network's architecture, freshly initialised, output layer ``Linear(h, M·C)``.
    """

    def __init__(self, body: nn.Module, n_features: int, n_outputs: int, n_params: int):
        super().__init__()
        self.body = body
        self.n_features, self.n_outputs = int(n_features), int(n_outputs)
        self.register_buffer("scale", torch.tensor(math.sqrt(n_params / n_features)))

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return self.scale * out.reshape(out.shape[0], self.n_features, self.n_outputs)


def _rng_devices(module: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})


def authors_surrogate(
    model: nn.Module, n_features: int, x: Tensor, seed: int = 0
) -> AuthorsSurrogate:
    """Their surrogate for ``model``: a fresh copy of its architecture, the output layer replaced
    by ``Linear(h, n_features·C)``, output ``× √(P/M)`` (``P``: all of ``model``'s parameters).

    ``x``: a batch the network runs on; the output layer is the one verified on it to produce
    the output as ``W φ + b`` (:func:`fastlla.network_head.find_head`). Every module of the copy
    is re-initialised with its ``reset_parameters``, drawing from a fork of the global RNG seeded
    with ``seed`` (the caller's RNG state is unchanged). ``model`` is not modified.

    Raises ``ValueError`` if ``n_features < 1``, if no output layer is verified (per-position or
    non-affine outputs), or if some parameter belongs to a module without ``reset_parameters``
    (it could not be freshly initialised).
    """
    if int(n_features) < 1:
        raise ValueError(f"authors_surrogate: n_features must be at least 1, got {n_features}")
    with _eval_mode(model):  # as theirs, which puts the network in eval mode for good; and
        head = find_head(model, x)  # find_head in train mode would update batch-norm statistics
    if head.output_layer is None or head.pooled:
        raise ValueError(
            "authors_surrogate: the network's output is not verified to be one nn.Linear of "
            f"(B, h) features ({head.reason or 'per-position output layer'}); their surrogate "
            "replaces that layer"
        )
    with torch.no_grad(), _eval_mode(model):
        C = model(x[:1]).shape[-1]
    n_params = sum(p.numel() for p in model.parameters())
    body = copy.deepcopy(model)
    covered = {id(p) for m in body.modules() if hasattr(m, "reset_parameters")
               for p in m.parameters(recurse=False)}  # fmt: skip
    missing = [n for n, p in body.named_parameters() if id(p) not in covered
               and not n.startswith(head.output_layer + ".")]  # fmt: skip
    if missing:
        raise ValueError(
            "authors_surrogate: cannot freshly initialise parameters held by modules without "
            f"reset_parameters: {missing[:5]}"
        )
    old: nn.Linear = body.get_submodule(head.output_layer)
    new = nn.Linear(old.in_features, int(n_features) * C, device="meta", dtype=old.weight.dtype)
    parent, _, attr = head.output_layer.rpartition(".")
    setattr(
        body.get_submodule(parent) if parent else body, attr, new.to_empty(device=old.weight.device)
    )
    # Draw every module's init in registration order, the new layer in its place: the draws
    # their hand-written ConvHead makes when constructed after torch.manual_seed(seed).
    with torch.random.fork_rng(devices=_rng_devices(model)):
        torch.manual_seed(seed)
        for m in body.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    for p in body.parameters():
        p.requires_grad_(True)
    return AuthorsSurrogate(body, n_features, C, n_params).to(old.weight.device)


# --------------------------------------------------------------------------- the estimator


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the block; every module's ``training`` flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _scale_tril_from_precision(P: Tensor) -> Tensor:
    """Lower-triangular ``L`` with ``L Lᵀ = P⁻¹`` (what ``torch.distributions``'
    ``_precision_to_scale_tril`` computes, which they call)."""
    Lf = torch.linalg.cholesky(torch.flip(P, (-2, -1)))
    L_inv = torch.transpose(torch.flip(Lf, (-2, -1)), -2, -1)
    eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    return torch.linalg.solve_triangular(L_inv, eye, upper=False)


def _safe_cholesky(A: Tensor) -> Tensor:
    """Their ``safe_cholesky``: Cholesky, retried with jitter ``1e-6·10^i`` (``1e-8`` in float64)
    on the diagonal, ``i = 0..9``, with a warning."""
    try:
        return torch.linalg.cholesky(A)
    except RuntimeError:
        if torch.isnan(A).any():
            raise
        base = 1e-6 if A.dtype == torch.float32 else 1e-8
        for i in range(10):
            jitter = base * 10**i
            try:
                L = torch.linalg.cholesky(A + jitter * torch.eye(A.shape[-1], dtype=A.dtype,
                                                                 device=A.device))  # fmt: skip
            except RuntimeError:
                continue
            warnings.warn(f"A not p.d., added jitter of {jitter} to the diagonal", RuntimeWarning,
                          stacklevel=2)  # fmt: skip
            return L
        raise


class AuthorsScaLLA:
    """Their ``ScaLLA`` estimator (see the module docstring for the recipe and the deviations).

    Parameters (theirs, with their defaults)
    ----------------------------------------
    model : the pre-trained network ``f``; not modified.
    feature_model : the surrogate, ``x ↦ (B, M, C)`` (:func:`authors_surrogate`); trained in place.
    likelihood : ``"classification"`` or ``"regression"``.
    prior_precision : initial ``δ`` (scalar), default 1.
    sigma_noise : initial ``σ`` (regression), default 1.
    y_mean, y_std : output de-normalisation of :meth:`predict` (regression), defaults 0 and 1.
    seed : seeds the private generator of the tangents, default 1234 (theirs; their run passes 0).
    """

    def __init__(self, model: nn.Module, feature_model: nn.Module, likelihood: str,
                 prior_precision: float = 1, sigma_noise: float = 1, y_mean: float = 0,
                 y_std: float = 1, seed: int = 1234):  # fmt: skip
        if likelihood not in ("regression", "classification"):
            raise ValueError("likelihood must be either 'regression' or 'classification'.")
        self.model = model
        p0 = next(iter(model.parameters()))
        self.device, self.dtype = p0.device, p0.dtype
        self.feature_model = feature_model.to(self.device).to(self.dtype)
        self.likelihood = likelihood
        self.mean = torch.cat([p.detach().reshape(-1) for p in model.parameters()])  # θ*
        self._prior_precision: Any = prior_precision
        self._sigma_noise: Any = sigma_noise
        self.prior_mean: Any = 0
        self.y_mean = torch.tensor(y_mean, device=self.device, dtype=self.dtype)
        self.y_std = torch.tensor(y_std, device=self.device, dtype=self.dtype)
        self.seed = seed
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._posterior_scale: Tensor | None = None
        self.H: Tensor | None = None
        self.loss: Any = 0
        self.n_outputs: int | None = None
        self.n_features: int | None = None
        self.num_train: int | None = None

    # ------------------------------------------------------------------ kernel matching

    def _true_jacobian(self, x: Tensor) -> Tensor:
        """One Rademacher JVP ``J(x) v`` over all the network's parameters, ``(B, C)``."""
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        tangents = {
            n: torch.sign(torch.rand(p.shape, generator=self.generator, device=p.device,
                                     dtype=p.dtype) - 0.5)
            for n, p in params.items()
        }  # fmt: skip
        with fwAD.dual_level():
            duals = {n: fwAD.make_dual(p, tangents[n]) for n, p in params.items()}
            out = functional_call(self.model, duals, (x,))
            jvp = fwAD.unpack_dual(out).tangent
        return jvp.detach()

    def kernel_loss(self, x: Tensor, n_train: int | None, zero_crossed_variances: bool,
                    weight_decay: float | None) -> Tensor:  # fmt: skip
        """One step's loss on the (concatenated) batch ``x``: ``mean((K − Q)²)`` over the
        materialised ``B×B×C×C`` tensors (``n_train``: where the zeroed blocks split)."""
        J = self._true_jacobian(x)
        phi = self.feature_model(x)
        K = torch.einsum("ia,jb->ijab", J, J)
        Q = torch.einsum("ika,jkb->ijab", phi, phi)
        if n_train is not None and zero_crossed_variances:
            K[:n_train, n_train:] *= 0.0
            K[n_train:, :n_train] *= 0.0
        loss = torch.mean((K - Q) ** 2)
        if weight_decay is not None:
            loss = loss + weight_decay * torch.norm(
                torch.cat([p.view(-1) for p in self.feature_model.parameters()])
            )
        return loss

    def kernel_steps(self, iterations: int, train_loader: Iterable,
                     context_points_loader: Iterable | None = None,
                     zero_crossed_variances: bool = False, weight_decay: float | None = None,
                     lr: float | None = None,
                     split_at_train_batch: bool = False) -> Iterator[float]:  # fmt: skip
        """Their kernel-matching loop, one yielded loss per step (the caller may stop early).

        With context, the zeroed blocks split at half the concatenated batch (theirs; a
        ``RuntimeWarning`` where that is not the training batch's size) or, with
        ``split_at_train_batch``, at the training batch's size (deviation 3)."""
        data = next(iter(train_loader))  # their shape pass (it also starts an epoch's shuffle)
        X = data[0].to(self.device).to(self.dtype)
        self.num_train = len(train_loader.dataset)  # type: ignore[attr-defined]
        with _eval_mode(self.model):
            self.feature_model.eval()
            with torch.no_grad():
                out = self.model(X[:1])
                self.n_features = self.feature_model(X[:1]).shape[-2]
            self.feature_model.train()
            self.n_outputs = out.shape[-1]
            self.loss = 0
            self.H = torch.zeros(self.n_features, self.n_features, device=self.device,
                                 dtype=self.dtype)  # fmt: skip
            optimizer = torch.optim.Adam(self.feature_model.parameters(),
                                         lr=1e-4 if lr is None else lr)  # fmt: skip
            train_iter = iter(train_loader)
            context_iter = (
                iter(context_points_loader) if context_points_loader is not None else None
            )
            for _ in range(iterations):
                try:
                    x, _y = next(train_iter)
                except StopIteration:
                    train_iter = iter(train_loader)
                    x, _y = next(train_iter)
                x = x.to(self.device).to(self.dtype)
                n_train = None
                if context_iter is not None:
                    try:
                        xc, _yc = next(context_iter)
                    except StopIteration:
                        context_iter = iter(context_points_loader)  # type: ignore[arg-type]
                        xc, _yc = next(context_iter)
                    rows = x.shape[0]
                    x = torch.cat([x, xc.to(self.device).to(self.dtype)], dim=0)
                    n_train = rows if split_at_train_batch else x.shape[0] // 2
                    if zero_crossed_variances and n_train != rows:
                        warnings.warn(
                            f"authors' ScaLLA: zeroing the cross blocks at {n_train} rows (half "
                            f"the batch, as theirs) but the training batch has {rows}; "
                            "split_at_train_batch=True splits there", RuntimeWarning,
                            stacklevel=2,
                        )  # fmt: skip
                loss = self.kernel_loss(x, n_train, zero_crossed_variances, weight_decay)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                yield loss.item()

    # ------------------------------------------------------------------ fit

    def fit(self, iterations: int, train_loader: Iterable,
            context_points_loader: Iterable | None = None, zero_crossed_variances: bool = False,
            weight_decay: float | None = None, lr: float | None = None,
            optimize_hyper_parameters: bool = True, prior_opt_lr: float = 1e-3,
            prior_opt_iterations: int = 100, callback: Callable[[int, float], None] | None = None,
            callback_every: int = 1, time_budget: float | None = None,
            split_at_train_batch: bool = False) -> tuple[list, list]:  # fmt: skip
        """Kernel matching (``iterations`` steps), the GGN pass, optional hyper-parameters.

        Their arguments and defaults; harness additions: ``callback(step, seconds)`` every
        ``callback_every`` steps and after the last, ``seconds`` being the training wall-clock so
        far with the callbacks' own time excluded; ``time_budget`` stops kernel matching once
        that many training seconds have passed; ``split_at_train_batch``: see
        :meth:`kernel_steps`. Returns ``(losses, [])`` as theirs does (their
        second list, ``losses_exact``, is always empty). Also sets ``self.train_seconds`` and
        ``self.steps``.
        """
        losses: list[float] = []
        trained, step = 0.0, 0
        steps = self.kernel_steps(iterations, train_loader, context_points_loader,
                                  zero_crossed_variances, weight_decay, lr,
                                  split_at_train_batch)  # fmt: skip
        t0 = time.perf_counter()
        for loss in steps:
            losses.append(loss)
            step += 1
            now = time.perf_counter()
            trained += now - t0
            done = step == iterations or (time_budget is not None and trained >= time_budget)
            if callback is not None and (step % callback_every == 0 or done):
                callback(step, trained)
            if done:
                break
            t0 = time.perf_counter()
        steps.close()  # leaves the loop's eval-mode block: the network's flags are restored
        self.steps, self.train_seconds = step, trained
        self._build_ggn(train_loader)
        if optimize_hyper_parameters:
            self.optimize_hyper_parameters(prior_opt_lr, prior_opt_iterations)
        self.feature_model.eval()
        return losses, []

    @torch.no_grad()
    def _build_ggn(self, train_loader: Iterable) -> None:
        """``H = Σ Φ Λ Φᵀ`` over the training loader (surrogate still in train mode, as theirs)."""
        self.loss, self.H = 0, torch.zeros_like(self.H)  # type: ignore[arg-type]
        with _eval_mode(self.model):
            for x, y in train_loader:
                x, y = x.to(self.device).to(self.dtype), y.to(self.device)
                phi = self.feature_model(x)
                f = self.model(x)
                if self.likelihood == "classification":
                    loss_batch = nn.CrossEntropyLoss()(f, y)
                    ps = torch.softmax(f, dim=-1)
                    G = torch.diag_embed(ps) - torch.einsum("mk,mc->mck", ps, ps)
                    H_batch = torch.einsum("bpc,bkc,bqk->pq", phi, G, phi)
                else:
                    loss_batch = 0.5 * nn.MSELoss(reduction="sum")(f, y)
                    H_batch = torch.einsum("bpc,bqc->pq", phi, phi)
                self.loss += loss_batch.detach()
                self.H += H_batch.detach()

    def optimize_hyper_parameters(self, lr: float = 1e-3, iterations: int = 100) -> list[float]:
        """Adam on ``log δ`` (and ``log σ``, regression) from 0, maximising their marginal
        likelihood; sets ``prior_precision`` (and ``sigma_noise``)."""
        log_sigma = torch.zeros(1, requires_grad=True, device=self.device)
        log_prior = torch.zeros(1, requires_grad=True, device=self.device)
        opt = torch.optim.Adam([log_prior, log_sigma], lr=lr)
        history = []
        for _ in range(iterations):
            opt.zero_grad()
            neg = -self.log_marginal_likelihood(
                log_prior.exp(), log_sigma.exp() if self.likelihood == "regression" else None
            )
            neg.backward()
            opt.step()
            history.append(neg.item())
        self.prior_precision = log_prior.exp().item()
        self.sigma_noise = log_sigma.exp().item()
        return history

    # ------------------------------------------------------------------ posterior

    @property
    def prior_precision(self) -> Any:
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: Any) -> None:
        self._posterior_scale = None
        if isinstance(value, (float, int)):
            self._prior_precision = torch.tensor([value], device=self.device)
        elif isinstance(value, Tensor):
            self._prior_precision = value.reshape(-1).to(self.device)
        else:
            raise ValueError("prior_precision must be a scalar or a torch.Tensor.")

    @property
    def sigma_noise(self) -> Any:
        return self._sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value: Any) -> None:
        self._posterior_scale = None
        if isinstance(value, (float, int)):
            self._sigma_noise = torch.tensor([value], device=self.device)
        elif isinstance(value, Tensor):
            self._sigma_noise = value.reshape(-1).to(self.device)
        else:
            raise ValueError("sigma_noise must be a scalar or a torch.Tensor.")

    @property
    def prior_precision_diag(self) -> Tensor:
        prior = self.prior_precision
        prior = prior if isinstance(prior, Tensor) else torch.tensor(prior, device=self.device)
        if self.n_features is None:
            raise RuntimeError("n_features is not set. Ensure `fit` has been called.")
        if prior.ndim == 0 or len(prior) == 1:
            return prior * torch.ones(self.n_features, device=self.device)
        if len(prior) == self.n_features:
            return prior
        raise ValueError("Mismatch between prior_precision and n_features.")

    @property
    def _H_factor(self) -> Any:
        return 1 / self.sigma_noise**2

    @property
    def posterior_precision(self) -> Tensor:
        if self.H is None:
            raise RuntimeError("Hessian (self.H) is not computed. Call `fit` first.")
        return self._H_factor * self.H + torch.diag(self.prior_precision_diag)

    @property
    def posterior_scale(self) -> Tensor:
        if self._posterior_scale is None:
            eye = torch.eye(self.n_features, device=self.device, dtype=self.dtype)  # type: ignore[arg-type]
            P = self.posterior_precision + 1e-6 * eye
            self._posterior_scale = _scale_tril_from_precision(P).to(self.dtype)
        return self._posterior_scale

    @property
    def posterior_covariance(self) -> Tensor:
        return self.posterior_scale @ self.posterior_scale.T

    @property
    def scatter(self) -> Tensor:
        delta = self.mean - self.prior_mean
        return (delta * self.prior_precision) @ delta

    @property
    def log_likelihood(self) -> Tensor:
        factor = -self._H_factor
        if self.likelihood == "regression":
            c = (
                0.5
                * self.num_train
                * self.n_outputs
                * torch.log(2 * torch.pi * self.sigma_noise**2)
            )
            return factor * self.loss - c
        return factor * self.loss

    @property
    def log_det_ratio(self) -> Tensor:
        return self.posterior_precision.logdet() - self.prior_precision_diag.log().sum()

    def log_marginal_likelihood(self, prior_precision: Tensor | None = None,
                                sigma_noise: Tensor | None = None) -> Tensor:  # fmt: skip
        if prior_precision is not None:
            self.prior_precision = prior_precision
        if sigma_noise is not None:
            if self.likelihood != "regression":
                raise ValueError("sigma_noise is only applicable for regression.")
            self.sigma_noise = sigma_noise
        return self.log_likelihood - 0.5 * (self.log_det_ratio + self.scatter)

    # ------------------------------------------------------------------ predictive

    @torch.no_grad()
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Network output ``(N, C)`` and the batch's full covariance ``(N, N, C, C)``."""
        x = x.to(self.device).to(self.dtype)
        with _eval_mode(self.model):
            F_mean = self.model(x)
        phi = self.feature_model(x)
        F_var = torch.einsum("npa,pq,mqb->nmab", phi, self.posterior_covariance, phi)
        return F_mean, F_var

    @torch.no_grad()
    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Theirs: :meth:`forward` with the surrogate in eval mode, de-normalised; regression
        adds ``σ²`` (after ``squeeze(-1)``)."""
        self.feature_model.eval()
        F_mean, F_var = self.forward(x)
        if self.likelihood == "regression":
            F_var = F_var.squeeze(-1) + self.sigma_noise**2
        return F_mean * self.y_std + self.y_mean, F_var * self.y_std**2

    @torch.no_grad()
    def predictive_covariance(self, x: Tensor, full_cross: bool = True) -> tuple[Tensor, Tensor]:
        """Mean ``(B, C)`` and the ``(B, C, C)`` blocks their evaluation uses (classification).

        ``full_cross=True`` (theirs): :meth:`predict`'s ``(B, B, C, C)`` tensor, then its
        diagonal; ``False``: only the diagonal blocks (same values, deviation 6).
        """
        if full_cross:
            F_mean, F_var = self.predict(x)
            return F_mean, F_var.diagonal(dim1=0, dim2=1).permute(2, 0, 1)
        self.feature_model.eval()
        x = x.to(self.device).to(self.dtype)
        with _eval_mode(self.model):
            F_mean = self.model(x)
        phi = self.feature_model(x)
        return F_mean, torch.einsum("npa,pq,nqb->nab", phi, self.posterior_covariance, phi)

    @torch.no_grad()
    def predict_proba(self, x: Tensor, n_samples: int = 2048, generator: torch.Generator | None = None,
                      full_cross: bool = True, as_published: bool = True) -> Tensor:  # fmt: skip
        """Class probabilities ``(B, C)``: ``softmax`` averaged over ``n_samples`` logit samples.

        Their metric: ``L = safe_cholesky(Σ)``, samples ``f + Lᵀ z`` (``as_published``; ``False``:
        ``f + L z``, deviation 6). ``generator``: the draws' generator (theirs is seeded with
        2147483647 once per evaluation); ``None``: a private one seeded so.
        """
        F_mean, F_var = self.predictive_covariance(x, full_cross)
        if generator is None:
            generator = torch.Generator(device=F_mean.device).manual_seed(2147483647)
        chol = _safe_cholesky(F_var)
        z = torch.randn(n_samples, *F_mean.shape, generator=generator, device=F_mean.device,
                        dtype=F_mean.dtype)  # fmt: skip
        spec = "sna,nab->snb" if as_published else "snb,nab->sna"
        return (F_mean + torch.einsum(spec, z, chol)).softmax(-1).mean(0)


def published_entropy(probs: Tensor) -> Tensor:
    """Their FMNIST script's OOD score: the entropy of ``softmax(probs)`` (``softmax`` applied
    to the MC-averaged probabilities), ``(B,)``."""
    p = probs.softmax(-1)
    return -(p * p.log()).sum(-1)


# --------------------------------------------------------------------------- benchmark driver


def authors_loader(
    x: Tensor, y: Tensor | None = None, batch_size: int = 5, seed: int = 0
) -> DataLoader:
    """Their training loader: ``DataLoader(..., batch_size=5, shuffle=True)`` (a permutation per
    epoch, no replacement), shuffled by a private generator seeded with ``seed``."""
    y = torch.zeros(x.shape[0], dtype=torch.long) if y is None else y
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=gen)


def authors_fit(model: nn.Module, x_train: Tensor, probe: Any, seconds: float,
                y_train: Tensor | None = None, n_features: int = 100, seed: int = 0,
                batch_size: int = 5, lr: float = 5e-5, checkpoints: list[float] | None = None,
                max_iterations: int = 10**9, log: Callable[[str], None] | None = None,
                x_context: Tensor | None = None, zero_crossed_variances: bool = False,
                return_estimator: bool = False) -> dict[str, Any]:  # fmt: skip
    """Their kernel matching, with the settings of their FMNIST run (:data:`PUBLISHED_FMNIST`),
    for ``seconds`` of training wall-clock; the held-out kernel error ``probe.error(Φ)`` (a
    :class:`fastlla.apps.fidelity.ProbeGram`) at the ``checkpoints`` (seconds; evaluation time
    excluded). ``x_context``: their context loader (same batch size) on these inputs.

    Returns ``{"curve": [{"step", "seconds", "error"}...], "iterations", "seconds_per_step",
    "final_error", "n_features_total"}`` (and ``"estimator"``, the fitted
    :class:`AuthorsScaLLA`, with ``return_estimator``).
    """
    surrogate = authors_surrogate(model, n_features, x_train[:batch_size], seed=seed)
    la = AuthorsScaLLA(model, surrogate, "classification", seed=seed)
    train = authors_loader(x_train, y_train, batch_size, seed)
    context = (
        authors_loader(x_context, None, batch_size, seed + 1) if x_context is not None else None
    )
    pending = sorted(checkpoints or [seconds * f for f in (0.01, 0.03, 0.1, 0.3, 0.6, 1.0)])
    points: list[dict[str, float]] = []

    def evaluate(step: int, trained: float) -> None:
        was = surrogate.training
        surrogate.eval()  # their feature_model.eval() at prediction time
        with torch.no_grad():
            err = probe.error(surrogate(probe.x))
        surrogate.train(was)
        points.append({"step": step, "seconds": trained, "error": err})
        if log:
            log(f"  authors step {step:7d} {trained:6.1f} s error {err:.4f}")

    def callback(step: int, trained: float) -> None:
        if (pending and trained >= pending[0]) or trained >= seconds or step == max_iterations:
            while pending and trained >= pending[0]:
                pending.pop(0)
            evaluate(step, trained)

    evaluate(0, 0.0)
    la.fit(max_iterations, train, context, zero_crossed_variances, weight_decay=0.0, lr=lr,
           optimize_hyper_parameters=False, callback=callback, time_budget=seconds)  # fmt: skip
    if points[-1]["step"] != la.steps:
        evaluate(la.steps, la.train_seconds)
    out = {"curve": points, "iterations": la.steps,
           "seconds_per_step": la.train_seconds / max(la.steps, 1),
           "final_error": points[-1]["error"], "n_features_total": n_features}  # fmt: skip
    if return_estimator:
        out["estimator"] = la
    return out
