"""The marginal likelihood (evidence) and the hyper-parameter searches over it.

:class:`Evidence` (a mixin of :class:`fastlla.laplace.LaplaceBase`) evaluates the Laplace evidence
``log p(D|θ*) − ½ θ*ᵀDθ* − ½ log det(I + D⁻¹ sG)`` from what a fit keeps — the log-likelihood
statistic at ``θ*``, ``‖θ*‖²`` and the GGN eigenvalues (MacKay 1992; Immer et al. 2021, eq. 5) —
and tunes ``δ`` (and ``σ``) by maximising it (``"marglik"``) or by a validation grid search
(``"gridsearch"``), as laplace-torch's ``optimize_prior_precision``, or reads it from the
network's initialisation (``"init"``, :mod:`fastlla.init_prior`).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .fit_state import _positive_float
from .init_prior import init_second_moments
from .predictive import Likelihood, class_probabilities, log_class_probabilities

__all__ = ["Evidence", "PRIOR_STRUCTURES"]

#: ``optimize_prior_precision(prior_structure=...)`` values (laplace-torch's ``PriorStructure``).
PRIOR_STRUCTURES = ("scalar", "layerwise", "diag")
#: method='init' warns where a trained tensor's mean square is this many times below its init's
SHRINK_LIMIT = 10
#: ... for tensors of at least this many entries (a few entries may end anywhere in training)
SHRINK_MIN_ENTRIES = 100


class Evidence:
    """Marginal likelihood and hyper-parameter optimisation; mixed into
    :class:`fastlla.laplace.LaplaceBase`."""

    def _log_likelihood(self, sigma: Tensor) -> Tensor:
        if self.likelihood is Likelihood.CLASSIFICATION:
            stat = torch.tensor(self._loglik_stat, dtype=torch.float64, device=sigma.device)
            return stat / self.temperature
        n_obs = self.n_data * self.n_outputs
        return -0.5 * self._loglik_stat * self._scale(sigma) - n_obs * torch.log(
            sigma * math.sqrt(2 * math.pi)
        )

    def _log_det_ratio(self, delta: Tensor, scale: Tensor) -> Tensor:
        if delta.numel() == 1:
            eig = self._eigvals().to(torch.float64)
            return torch.log1p(eig * (scale / delta.reshape(()))).sum()
        return self._log_det_ratio_diag(self._expand_prior(delta), scale)

    def _log_det_ratio_diag(self, delta: Tensor, scale: Tensor) -> Tensor:
        """``log det(sG + D) − log det D`` for a diagonal prior ``D`` (ExactLLA)."""
        raise NotImplementedError

    def _scatter(self, delta: Tensor) -> Tensor:
        """``θ*ᵀ D θ*``."""
        if delta.numel() == 1:
            return delta.reshape(()) * self._param_norm2
        theta2 = self._theta().to(torch.float64).square()
        return (self._expand_prior(delta) * theta2).sum()

    def _evidence(self, delta: Tensor, sigma: Tensor) -> Tensor:
        """``log p(D|θ*) − ½ θ*ᵀDθ* − ½ log det(I + D⁻¹ sG)`` for checked ``δ``, ``σ``."""
        return (
            self._log_likelihood(sigma)
            - 0.5 * self._scatter(delta)
            - 0.5 * self._log_det_ratio(delta, self._scale(sigma))
        )

    def _hyper(self, prior_precision: Any, sigma_noise: Any) -> tuple[Tensor, Tensor]:
        """The given ``(δ, σ)`` checked, or the current ones where ``None``."""
        delta = self._prior_precision if prior_precision is None else self._parse_prior(
            prior_precision
        )
        sigma = self._sigma_noise if sigma_noise is None else self._parse_sigma(sigma_noise)
        return delta, sigma

    @property
    def log_likelihood(self) -> Tensor:
        """``log p(D | θ*)`` (Gaussian with noise ``σ`` for regression), scaled by ``1/T``: a
        0-dim float64 tensor, read as laplace-torch's property (``la.log_likelihood``) or
        called with a new ``σ`` (``la.log_likelihood(sigma_noise)``, differentiable in a
        ``sigma_noise`` tensor that requires grad; nothing is stored)."""
        self._check_fitted()
        return _CallableValue.of(self._log_likelihood(self._sigma_noise), self._log_likelihood_at)

    def _log_likelihood_at(self, sigma_noise: float | Tensor | None = None) -> Tensor:
        self._check_fitted()
        return self._log_likelihood(self._hyper(None, sigma_noise)[1])

    @property
    def log_det_ratio(self) -> Tensor:
        """``log det(sG + D) − log det D``: ``log det(I + sG/δ)`` for a scalar ``δ``; ``G`` the
        GGN, ``s = 1/(σ²T)`` (``1/T`` for classification). A 0-dim float64 tensor, read as
        laplace-torch's property (``la.log_det_ratio``) or called with new hyper-parameters
        (``la.log_det_ratio(prior_precision, sigma_noise)``, differentiable in both; nothing
        is stored)."""
        self._check_fitted()
        value = self._log_det_ratio(self._prior_precision, self._scale(self._sigma_noise))
        return _CallableValue.of(value, self._log_det_ratio_at)

    def _log_det_ratio_at(
        self, prior_precision: float | Tensor | None = None, sigma_noise: float | Tensor | None = None
    ) -> Tensor:
        self._check_fitted()
        delta, sigma = self._hyper(prior_precision, sigma_noise)
        return self._log_det_ratio(delta, self._scale(sigma))

    def log_marginal_likelihood(
        self, prior_precision: float | Tensor | None = None, sigma_noise: float | Tensor | None = None
    ) -> Tensor:
        """Laplace evidence ``log p(D|θ*) − ½ θ*ᵀDθ* − ½ log det(I + D⁻¹ sG)``.

        Parameters
        ----------
        prior_precision, sigma_noise : optional new ``δ`` and ``σ`` (numbers or tensors, checked
            as in the constructor); ``None`` uses the current ones. As in laplace-torch, values
            given are stored (detached) as the estimator's hyper-parameters, so tuning them with
            a gradient loop leaves the tuned values in place; a refused value changes nothing.

        Returns
        -------
        A 0-dim float64 tensor, differentiable in ``prior_precision`` and ``sigma_noise``
        tensors that require grad. With a scalar ``δ`` each evaluation costs ``O(M)`` once fitted
        (one eigendecomposition serves every ``(δ, σ)``); a per-layer or per-parameter ``δ``
        (ExactLLA) costs one Cholesky factorisation.
        """
        self._check_fitted()
        delta, sigma = self._hyper(prior_precision, sigma_noise)
        value = self._evidence(delta, sigma)
        if prior_precision is not None:
            self._prior_precision = delta.detach().clone()
        if sigma_noise is not None:
            self._sigma_noise = sigma.detach().clone()
        return value

    def _n_layers(self) -> int | None:
        """Parameter tensors the posterior is over (``None``: no per-layer prior)."""
        return None

    def _layerwise_size(self) -> int:
        """``_n_layers()``, or a clear error where a per-layer prior does not apply."""
        n_layers = self._n_layers()
        if n_layers is None:
            raise ValueError(
                f"fastlla: prior_structure='layerwise' does not apply to {type(self).__name__}"
                " here; use 'scalar' or 'diag'"
            )
        return n_layers

    def optimize_prior_precision(
        self,
        method: str | None = None,
        val_loader: Iterable | None = None,
        grid: Iterable[float] | None = None,
        optimize_sigma_noise: bool = False,
        link_approx: str = "probit",
        *,
        pred_type: str = "glm",
        n_samples: int = 100,
        loss: Any = None,
        grid_size: int | None = None,
        log_prior_prec_min: float = -4.0,
        log_prior_prec_max: float = 4.0,
        log_prior_prec_base: float = 10.0,
        n_steps: int | None = None,
        lr: float | None = None,
        init_prior_prec: float | Tensor | None = None,
        prior_structure: str = "scalar",
        progress_bar: bool = False,
        verbose: bool = False,
    ) -> float | Tensor:
        """Choose ``δ`` (and, for regression with ``optimize_sigma_noise``, ``σ``).

        Takes laplace-torch's keywords; the defaults are fastlla's where they differ. By default
        (no ``method``) the prior is the network's initialisation's (``"init"``), or, given a
        ``val_loader``, the one of least validation NLL (``"gridsearch"``). laplace-torch's
        default, ``"marglik"``, chooses a prior 90–1000× too broad for networks trained with a
        small or no weight decay, whose predictive is then far worse calibrated than the network
        (docs/calibration.md); ask for it by name.

        Parameters
        ----------
        method : ``None`` (default): ``"gridsearch"`` with a ``val_loader``, else ``"init"``.
            ``"marglik"`` maximises :meth:`log_marginal_likelihood`. With
            ``prior_structure="scalar"`` (default; laplace-torch's default is ``"diag"``) it is
            exact and cheap, since one eigendecomposition serves every ``(δ, σ)``: a log-spaced
            grid over ``δ ∈ [e⁻¹², e¹²]``, then golden-section refinement in ``log δ``
            (coordinate-wise with ``log σ``); ``init_prior_prec``, ``n_steps`` and ``lr`` do not
            apply. ``"layerwise"`` (one ``δ`` per parameter tensor) or ``"diag"`` (one per
            parameter), or an ``init_prior_prec`` tensor of such a length, run laplace-torch's
            Adam on ``log δ`` (``n_steps`` steps, default 100, of rate ``lr``, default 0.1, from
            ``init_prior_prec``, default 1; these three go with ``"marglik"`` only; with
            ``optimize_sigma_noise`` also on ``log σ``); ExactLLA only.
            ``"init"`` reads the prior from the network's initialisation, the prior the data left
            unchanged in every direction they did not constrain (:mod:`fastlla.init_prior`;
            docs/calibration.md): each module's ``reset_parameters`` is re-run on a copy to
            measure ``E[θ²]`` per parameter tensor; ``prior_structure="scalar"`` gives
            ``δ = P / Σ E[θ²]`` (the isotropic prior with the initialisation's expected
            ``‖θ‖²``; ``3·fan_in`` for one PyTorch-default ``nn.Linear``), ``"layerwise"`` and
            ``"diag"`` (ExactLLA) ``1/E[θ²]`` per tensor or parameter; with
            ``optimize_sigma_noise`` (regression) ``σ`` maximises the evidence at that ``δ``. It
            raises a ``ValueError`` for a parameter whose module has no initialiser to re-run,
            and warns where a trained tensor (of ≥ 100 entries) has a mean square over
            ``SHRINK_LIMIT`` (10) times below its initialiser's (a network initialised
            otherwise, e.g. a pre-trained ``transformers`` model: choose ``δ`` on held-out data
            there).
            ``"gridsearch"`` minimises the predictive NLL on ``val_loader`` (or ``loss``) over
            ``grid``, default ``grid_size`` (21) values log-spaced between
            ``log_prior_prec_base**log_prior_prec_min`` and ``**log_prior_prec_max``
            (``1e-4`` to ``1e4``).
        val_loader : ``(x, y)`` or dict batches for ``"gridsearch"``.
        grid : explicit prior precisions for ``"gridsearch"`` (not with ``grid_size``).
        optimize_sigma_noise : also tune ``σ`` by the evidence (regression, ``"marglik"`` and
            ``"init"``).
        link_approx, n_samples, pred_type : the predictive scored by ``"gridsearch"``
            (``pred_type`` must be ``"glm"``).
        loss : ``"gridsearch"`` score instead of the NLL: a torchmetrics-style metric (with
            ``update``/``compute``) or a callable ``loss(probs, y)`` (classification) or
            ``loss(f_mean, f_var, y)`` (regression) on the whole validation set, lower better.
        progress_bar, verbose : a tqdm bar over the grid or the Adam steps; print the result.

        Returns
        -------
        The chosen ``δ``, also stored in ``prior_precision``: a float for a scalar prior, else a
        tensor. Errors leave the hyper-parameters unchanged.
        """
        self._check_fitted()
        if prior_structure not in PRIOR_STRUCTURES:
            raise ValueError(
                f"fastlla: prior_structure must be one of {PRIOR_STRUCTURES}, got "
                f"{prior_structure!r}"
            )
        if pred_type != "glm":
            raise ValueError(f"fastlla: only pred_type='glm' is supported, got {pred_type!r}")
        if method is None:
            method = "init" if val_loader is None else "gridsearch"
        if method not in ("marglik", "init", "gridsearch"):
            raise ValueError(
                f"fastlla: unknown method {method!r}; use 'marglik', 'init' or 'gridsearch'"
            )
        if val_loader is not None and method != "gridsearch":
            warnings.warn(
                f"fastlla: val_loader is ignored by method={method!r} (did you mean "
                "method='gridsearch'?)",
                UserWarning,
                stacklevel=2,
            )
        adam = {"n_steps": n_steps, "lr": lr, "init_prior_prec": init_prior_prec}
        given = [k for k, v in adam.items() if v is not None]
        if given and method != "marglik":
            raise ValueError(
                f"fastlla: {', '.join(given)} go with method='marglik' (laplace-torch's default; "
                f"fastlla's is 'init'), not method={method!r}"
            )
        if method == "marglik":
            init = self._parse_prior(1.0 if init_prior_prec is None else init_prior_prec)
            if init.numel() == 1 and prior_structure == "scalar":
                self._optimize_marglik(optimize_sigma_noise)
            else:
                self._optimize_marglik_adam(
                    init, prior_structure, optimize_sigma_noise, 100 if n_steps is None else n_steps,
                    0.1 if lr is None else lr, progress_bar,
                )
        elif method == "init":
            delta = self._init_prior(prior_structure)
            sigma = self._sigma_noise
            if optimize_sigma_noise and self.likelihood is Likelihood.REGRESSION:
                sigma = self._evidence_sigma(self._parse_prior(delta))
            self.prior_precision = delta
            self.sigma_noise = sigma
        else:
            if val_loader is None:
                raise ValueError("fastlla: method='gridsearch' needs a val_loader")
            if grid is not None and grid_size is not None:
                raise ValueError("fastlla: give either grid or grid_size, not both")
            if grid is None:
                n = 21 if grid_size is None else int(grid_size)
                if n < 1:
                    raise ValueError(f"fastlla: grid_size must be at least 1, got {grid_size}")
                grid = torch.logspace(
                    log_prior_prec_min, log_prior_prec_max, n, base=log_prior_prec_base,
                    dtype=torch.float64,
                ).tolist()  # fmt: skip
            grid = [_positive_float("grid value", d) for d in grid]
            if not grid:
                raise ValueError("fastlla: the prior-precision grid is empty")
            self._gridsearch(val_loader, grid, loss, link_approx, n_samples, progress_bar)
        if verbose:
            print(f"fastlla: optimized prior precision is {self.prior_precision.tolist()}")
        d = self._prior_precision
        return float(d) if d.numel() == 1 else d.clone()

    def _init_prior(self, structure: str) -> float | Tensor:
        """The initialisation prior (:mod:`fastlla.init_prior`) in ``structure``: ``"scalar"``
        ``δ = P / Σ E[θ²]`` over the posterior's ``P`` parameters; ``"layerwise"`` and
        ``"diag"`` ``1/E[θ²]`` per parameter tensor or per parameter, the scalar value where the
        initialiser sets a tensor to zero."""
        moments = init_second_moments(self.network.model, self.network.names)
        _warn_if_not_drawn_from(moments, self.network)
        sizes = torch.tensor(self.network.numels)
        entries = self._posterior_entries(torch.repeat_interleave(moments, sizes))
        if not entries.sum() > 0:
            raise ValueError(
                "fastlla: the initialiser sets every parameter to zero; the initialisation "
                "prior is undefined — give prior_precision instead"
            )
        isotropic = entries.numel() / float(entries.sum())
        if structure == "scalar":
            return isotropic
        if structure == "layerwise":
            self._layerwise_size()
        per = moments if structure == "layerwise" else entries
        return torch.where(per > 0, 1 / per.clamp_min(torch.finfo(per.dtype).tiny), isotropic)

    def _evidence_sigma(self, delta: Tensor) -> float:
        """The ``σ`` maximising the evidence at a fixed, checked ``δ``."""
        kw = dict(dtype=torch.float64, device=self.device)
        log_sigma = _maximise_1d(
            lambda t: float(self._evidence(delta, torch.tensor(math.exp(t), **kw))), -8.0, 6.0
        )
        return math.exp(log_sigma)

    def _optimize_marglik(self, optimize_sigma: bool) -> None:
        fit_sigma = optimize_sigma and self.likelihood is Likelihood.REGRESSION
        log_delta, log_sigma = math.log(float(self._prior_precision[0])), math.log(
            float(self._sigma_noise)
        )
        kw = dict(dtype=torch.float64, device=self.device)

        def evidence(log_d: float, log_s: float) -> float:
            delta = torch.tensor([math.exp(log_d)], **kw)
            return float(self._evidence(delta, torch.tensor(math.exp(log_s), **kw)))

        for _ in range(4 if fit_sigma else 1):
            log_delta = _maximise_1d(lambda t: evidence(t, log_sigma), -12.0, 12.0)
            if fit_sigma:
                log_sigma = _maximise_1d(lambda t: evidence(log_delta, t), -8.0, 6.0)
        delta, sigma = math.exp(log_delta), math.exp(log_sigma)
        self.prior_precision = delta
        self.sigma_noise = sigma

    def _optimize_marglik_adam(
        self, init: Tensor, structure: str, optimize_sigma: bool, n_steps: int, lr: float,
        progress_bar: bool,
    ) -> None:
        """laplace-torch's marglik tuning: Adam on ``log δ`` (and ``log σ``)."""
        if init.numel() == 1:  # a scalar init with prior_structure 'scalar' never comes here
            n = self._layerwise_size() if structure == "layerwise" else int(self._theta().numel())
            init = self._parse_prior(init.expand(n).clone())
        fit_sigma = optimize_sigma and self.likelihood is Likelihood.REGRESSION
        log_delta = init.detach().log().clone().requires_grad_(True)
        log_sigma = self._sigma_noise.detach().log().clone().requires_grad_(fit_sigma)
        optimizer = torch.optim.Adam([log_delta, log_sigma] if fit_sigma else [log_delta], lr=lr)
        for _ in tqdm(range(int(n_steps)), disable=not progress_bar, desc="marglik"):
            optimizer.zero_grad()
            loss = -self._evidence(log_delta.exp(), log_sigma.exp())
            loss.backward()
            optimizer.step()
        delta, sigma = log_delta.detach().exp(), log_sigma.detach().exp()
        self._parse_prior(delta), self._parse_sigma(sigma)  # both checked before either is set
        self.prior_precision = delta
        self.sigma_noise = sigma

    def _gridsearch(
        self, val_loader: Iterable, grid: list[float], loss: Any, link: str, n_samples: int,
        progress_bar: bool,
    ) -> None:
        """Set ``δ`` to the first grid value of least validation score (laplace-torch's
        ``gridsearch``): the summed predictive NLL in log space, or a user ``loss``."""
        online = all(hasattr(loss, a) for a in ("update", "compute"))
        if loss is not None and not online and not callable(loss):
            raise TypeError("fastlla: loss must be a metric (update/compute) or a callable")
        cached = []  # the network runs once; only the covariance depends on δ
        for x, y in self._batches(val_loader, "val_loader"):
            f, feats = self._outputs_and_features(x)
            self._check_outputs(f, y)
            cached.append((f, feats, y))
        best, best_value = None, math.inf
        for delta in tqdm(grid, disable=not progress_bar, desc="gridsearch"):
            covs = [self._covariance_from_features(feats, delta, self.data_scale) for _, feats, _ in cached]
            if loss is None:
                value = sum(
                    float(self._nll_sum(f, cov, y, link, n_samples))
                    for (f, _, y), cov in zip(cached, covs)
                )
            else:
                value = self._loss_value(loss, online, cached, covs, link, n_samples)
            if value < best_value:
                best, best_value = delta, value
        if best is None:
            raise ValueError("fastlla: every prior precision of the grid gave a non-finite score")
        self.prior_precision = best

    def _loss_value(
        self, loss: Any, online: bool, cached: list, covs: list[Tensor], link: str, n_samples: int
    ) -> float:
        """A user ``loss`` over the validation set: a metric updated per batch, or a callable
        of the whole set's predictions (probabilities, or mean and covariance)."""
        if online and hasattr(loss, "reset"):
            loss.reset()
        outputs, targets = [], []
        for (f, _, y), cov in zip(cached, covs):
            if self.likelihood is Likelihood.CLASSIFICATION:
                out = (class_probabilities(f, cov, link, n_samples=n_samples),)
            else:
                out = (f, cov)
            if online:
                try:
                    loss.update(*out, y)
                except TypeError:  # a metric of (prediction, target) only
                    loss.update(out[0], y)
            else:
                outputs.append(out)
                targets.append(y)
        if online:
            return float(torch.as_tensor(loss.compute()).sum())
        columns = [torch.cat(c) for c in zip(*outputs)]
        return float(torch.as_tensor(loss(*columns, torch.cat(targets))).sum())

    def _nll_sum(
        self, f: Tensor, cov: Tensor, y: Tensor, link: str, n_samples: int = 100
    ) -> Tensor:
        if self.likelihood is Likelihood.CLASSIFICATION:
            # log space: a confidently wrong point costs its (large, finite) −log p, never inf
            logp = log_class_probabilities(f, cov, link, n_samples=n_samples)
            return -logp.gather(1, y.view(-1, 1).long()).double().sum()
        var = torch.diagonal(cov, dim1=-2, dim2=-1).double() + self.sigma_noise**2
        resid = y.reshape(f.shape).double() - f.double()
        return 0.5 * (torch.log(2 * math.pi * var) + resid.square() / var).sum()


class _CallableValue(Tensor):
    """A tensor that can also be called: laplace-torch reads ``log_likelihood`` and
    ``log_det_ratio`` as properties, fastlla calls them with new hyper-parameters (the one
    differentiable access to them at given ``(δ, σ)``: the setters store detached values); the
    value serves both. A call recomputes; any operation on the value gives a plain tensor, and
    it is saved, pickled and copied as the plain tensor (the estimator the call needs is not)."""

    _fn: Any

    @staticmethod
    def of(value: Tensor, fn: Any) -> Tensor:
        out = value.as_subclass(_CallableValue)  # the same data and autograd graph
        out._fn = fn
        return out

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._fn(*args, **kwargs)

    def __repr__(self, **kwargs: Any) -> str:
        return repr(self.as_subclass(Tensor))

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.as_subclass(Tensor).__reduce_ex__(protocol)

    def __deepcopy__(self, memo: dict[int, Any]) -> Tensor:
        return copy.deepcopy(self.as_subclass(Tensor), memo)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def _warn_if_not_drawn_from(moments: Tensor, network: Any) -> None:
    """Warn where a trained tensor's mean square lies far below its initialiser's ``E[θ²]``
    (tensors of at least ``SHRINK_MIN_ENTRIES``):
    training from that initialisation rarely shrinks a tensor tenfold, so the network was
    probably initialised otherwise (a pre-trained ``transformers`` model, whose own init is
    not its modules' ``reset_parameters``), and the init prior is then too broad there."""
    params = network.params().values()
    trained = [(p.numel(), float(p.detach().double().square().mean())) for p in params]
    off = [
        name for name, m, (n, t) in zip(network.names, moments.tolist(), trained)
        if n >= SHRINK_MIN_ENTRIES and m > 0 and t < m / SHRINK_LIMIT
    ]  # fmt: skip
    if off:
        shown = ", ".join(repr(n) for n in off[:3]) + (f" and {len(off) - 3} more" if len(off) > 3 else "")
        warnings.warn(
            f"fastlla: the trained values of {shown} are over {SHRINK_LIMIT}x smaller in mean "
            "square than their modules' reset_parameters draws: the network was probably not "
            "initialised by reset_parameters, and method='init' then gives too broad a prior; "
            "choose the prior precision on held-out data (val_loader=...)",
            UserWarning,
            stacklevel=4,
        )


def _maximise_1d(fn, lo: float, hi: float, n_grid: int = 49, n_golden: int = 40) -> float:
    """Maximise a (unimodal near its peak) function of one variable: grid, then golden section."""
    xs = [lo + (hi - lo) * i / (n_grid - 1) for i in range(n_grid)]
    values = [fn(x) for x in xs]
    i = max(range(n_grid), key=lambda k: values[k])
    a, b = xs[max(i - 1, 0)], xs[min(i + 1, n_grid - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = fn(c), fn(d)
    for _ in range(n_golden):
        if fc > fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = fn(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = fn(d)
    return 0.5 * (a + b)
