"""The predictive API every estimator shares (laplace-torch's), over its GLM predictive.

:class:`Prediction` (a mixin of :class:`fastlla.laplace.LaplaceBase`) turns the estimator's
``C×C`` predictive covariance of the linearised network into laplace-torch's outputs —
``la(x, pred_type, link_approx)``, ``predictive_samples``, ``functional_samples``,
``functional_variance``/``functional_covariance`` and ``jacobians`` — and its posterior
properties (``mean``, ``posterior_precision``, ``posterior_scale``, ``log_prob``, ...).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .functional import batch_size, check_finite, to_device
from .posterior import precision_to_scale_tril
from .predictive import (
    Likelihood,
    LinkApprox,
    PredType,
    class_probabilities,
    gaussian_samples,
)

__all__ = ["Prediction"]


class Prediction:
    """laplace-torch's predictive API and posterior properties; mixed into
    :class:`fastlla.laplace.LaplaceBase`."""

    def _prediction_inputs(self, x: Any, fitting: bool = False) -> Any:
        """``x`` on the model's device, checked (finite; batched, except reward inputs)."""
        self._check_fitted()
        x = to_device(self._model_input(x), self.device, self.input_dtype)
        check_finite("the inputs", x)
        if fitting or not self.reward_modeling:  # reward inputs have one dimension less than pairs
            self._check_batched(x)
        return x

    def _predicts_regression(self, fitting: bool) -> bool:
        """Whether predictions are a regression's (reward modelling: unless ``fitting``)."""
        if self.reward_modeling:
            return not fitting
        return self.likelihood is Likelihood.REGRESSION

    def _expected_outputs(self, fitting: bool) -> int | None:
        """The outputs a prediction must have (``None``: any — a reward model's single inputs)."""
        return None if self.reward_modeling and not fitting else self.n_outputs

    def predictive_distribution(
        self, x: Any, joint: bool = False, diagonal_output: bool = False, fitting: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Gaussian over the outputs of the linearized network (laplace-torch's
        ``_glm_predictive_distribution``).

        Returns ``(f_mean, f_cov)``: the network's outputs ``f(x)`` (B, C) and the covariance
        ``Σ(x)`` (B, C, C). ``diagonal_output=True``: the variances (B, C) instead, computed
        without forming any ``C×C`` block (the residual-variance block of a ScaLLA with
        ``residual_variance`` on excepted). ``joint=True``: ``f`` flattened (B·C,) and the joint
        covariance of every output of every input (B·C, B·C), index ``b·C + c``.
        ``fitting`` (reward modelling): the pair classification's outputs instead of the reward's.

        A batch of no inputs gives empty results (the network is not run). Raises
        :class:`NotFittedError` before ``fit`` and :class:`ModelChangedError` if the model
        changed since; ``ValueError`` for ``joint`` with ``diagonal_output``.
        """
        if joint and diagonal_output:
            raise ValueError("fastlla: joint=True and diagonal_output=True exclude each other")
        x = self._prediction_inputs(x, fitting)
        n_outputs = self._expected_outputs(fitting)
        if batch_size(x) == 0:  # the network is not run on a batch of no inputs
            C, kw = n_outputs or 1, {"dtype": self.dtype, "device": self.device}
            if joint:
                return torch.empty(0, **kw), torch.empty(0, 0, **kw)
            shape = (0, C) if diagonal_output else (0, C, C)
            return torch.empty(0, C, **kw), torch.empty(shape, **kw)
        delta, scale = self._delta(), self.data_scale
        if diagonal_output:
            f, cov = self._outputs_and_variance(x, delta, scale)
        elif joint:
            f, cov = self._outputs_and_joint_covariance(x, delta, scale)
        else:
            f, features = self._outputs_and_features(x)
            self._check_outputs(f, n_outputs=n_outputs)
            cov = self._covariance_from_features(features, delta, scale)
        self._check_outputs(f, n_outputs=n_outputs)
        return (f.reshape(-1) if joint else f), cov

    def __call__(
        self,
        x: Any,
        pred_type: str = "glm",
        joint: bool = False,
        link_approx: str = "probit",
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        fitting: bool = False,
        *,
        include_noise: bool = False,
        seed: int = 0,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The predictive, with laplace-torch's arguments in its order.

        Parameters
        ----------
        pred_type : ``"glm"`` (the linearized network) or ``"nn"`` (the network at weights
            sampled from the posterior, ``n_samples`` of them; needs ``link_approx="mc"``, as in
            laplace-torch). ExactLLA samples weights; ScaLLA, which has no weight-space
            posterior, samples functions of the linearized network instead (its ``"nn"`` is the
            GLM predictive by Monte Carlo).
        joint : regression: the joint ``(f_mean (B·C,), f_cov (B·C, B·C))`` over the batch.
        link_approx : classification: ``"probit"``, ``"bridge"`` / ``"bridge_norm"``
            (laplace-torch's Laplace bridge after the zero-mean correction;
            ``"bridge_uncorrected"`` without it) or ``"mc"`` (``n_samples`` draws); see
            :class:`fastlla.predictive.LinkApprox`.
        diagonal_output : use the output variances only (no ``C×C`` blocks): regression returns
            ``f_var`` (B, C); classification's ``"probit"`` and ``"mc"`` use the diagonal (the
            bridge's zero-mean correction needs the full covariance and ignores it, as in
            laplace-torch).
        generator : a ``torch.Generator`` for the samples; without one, sampling is seeded by
            ``seed`` (a call is reproducible; the global RNG is never used).
        fitting : reward modelling: the pair classification instead of the reward regression.
        include_noise : regression: add ``σ²`` to the variances (fastlla's option).

        Returns
        -------
        Classification: probabilities (B, C). Regression (and reward prediction): ``(f_mean,
        f_var)`` with ``f_mean`` (B, C) and ``f_var`` (B, C, C), (B, C) with
        ``diagonal_output`` or for ``pred_type="nn"`` (the samples' unbiased variance), or the
        joint form above.
        """
        pred_type = PredType.parse(pred_type)
        link = LinkApprox.parse(link_approx)
        regression = self._predicts_regression(fitting)
        if joint and not regression:
            raise ValueError(
                "fastlla: joint=True is a regression predictive (laplace-torch ignores it for "
                "classification); use functional_samples for joint class samples"
            )
        given = self._own_generator(generator)  # else the seeded draws (the fused op for "mc")
        if not given and (pred_type is PredType.NN or link is LinkApprox.MC):
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
        if pred_type is PredType.NN:
            if link is not LinkApprox.MC:
                raise ValueError("fastlla: pred_type='nn' needs link_approx='mc'")
            if regression and int(n_samples) < 2:
                raise ValueError("fastlla: a sampled regression variance needs n_samples >= 2")
            f = self.functional_samples(x, "nn", n_samples, generator=generator, fitting=fitting)
            if regression:
                mean, var = f.mean(0), f.var(0) if f.shape[1] else f.sum(0)
                return mean, var + self.sigma_noise.to(var.dtype) ** 2 if include_noise else var
            return torch.softmax(f, dim=-1).mean(0)
        if regression:
            mean, cov = self.predictive_distribution(x, joint, diagonal_output, fitting)
            return mean, self._with_noise(cov, diagonal_output) if include_noise else cov
        bridge = link not in (LinkApprox.PROBIT, LinkApprox.MC)
        # the probit reads only the variances: no C×C blocks are formed for it
        diagonal = link is LinkApprox.PROBIT or (diagonal_output and not bridge)
        mean, cov = self.predictive_distribution(x, diagonal_output=diagonal, fitting=fitting)
        if link is LinkApprox.MC and (diagonal_output or given):
            return torch.softmax(gaussian_samples(mean, cov, n_samples, generator), -1).mean(0)
        return class_probabilities(mean, cov, link, n_samples=n_samples, seed=seed)

    def predictive(
        self, x: Any, pred_type: str = "glm", link_approx: str = "probit", n_samples: int = 100
    ) -> Tensor | tuple[Tensor, Tensor]:
        """laplace-torch's alias of :meth:`__call__` with these four arguments."""
        return self(x, pred_type=pred_type, link_approx=link_approx, n_samples=n_samples)

    @staticmethod
    def _own_generator(generator: Any) -> bool:
        """Whether the user passed ``generator`` (checked); the default MC uses the seeded op."""
        if generator is None:
            return False
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"fastlla: generator must be a torch.Generator, got {generator!r}")
        return True

    def _with_noise(self, cov: Tensor, diagonal: bool) -> Tensor:
        """``cov`` plus ``σ²`` on its diagonal (``diagonal``: ``cov`` holds variances)."""
        noise = self.sigma_noise.to(cov.dtype) ** 2
        if diagonal:
            return cov + noise
        return cov + noise * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)

    def _rng(self, generator: torch.Generator | None) -> torch.Generator:
        """``generator`` (checked), or the estimator's own: a private generator seeded with 0
        at first use that advances with each draw (the global RNG is never used)."""
        if self._own_generator(generator):
            return generator
        if getattr(self, "_own_rng", None) is None:
            self._own_rng = torch.Generator(device=self.device).manual_seed(0)
        return self._own_rng

    def functional_samples(
        self,
        x: Any,
        pred_type: str = "glm",
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        *,
        fitting: bool = False,
    ) -> Tensor:
        """Samples of the outputs (S, B, C) (laplace-torch's ``functional_samples``).

        ``"glm"``: draws of ``N(f(x), Σ(x))`` per input, independent across inputs
        (``diagonal_output``: of the variances only; laplace-torch reuses one standard-normal
        draw for every input of a batch — for one input the draws coincide with a generator
        seeded alike). ``"nn"``: the network at weights drawn by :meth:`sample` (ExactLLA);
        ScaLLA, which has no weight-space posterior, returns the ``"glm"`` draws.
        ``generator``: a ``torch.Generator``; default the estimator's own (seeded with 0 at
        first use, advancing: successive calls give new draws). ``fitting``: as in
        :meth:`__call__`.
        """
        pred_type = PredType.parse(pred_type)
        generator = self._rng(generator)
        if int(n_samples) < 1:
            raise ValueError(f"fastlla: n_samples must be at least 1, got {n_samples}")
        if pred_type is PredType.NN:
            return self._nn_functional_samples(x, int(n_samples), generator, fitting)
        mean, cov = self.predictive_distribution(x, False, diagonal_output, fitting)
        return gaussian_samples(mean, cov, n_samples, generator)

    def predictive_samples(
        self,
        x: Any,
        pred_type: str = "glm",
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        *,
        fitting: bool = False,
    ) -> Tensor:
        """:meth:`functional_samples` through the inverse link (S, B, C): softmax for
        classification, the samples themselves for regression and reward prediction."""
        f = self.functional_samples(
            x, pred_type, n_samples, diagonal_output, generator, fitting=fitting
        )
        return f if self._predicts_regression(fitting) else torch.softmax(f, dim=-1)

    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None) -> Tensor:
        """Weights drawn from the posterior ``N(θ*, P⁻¹)``, (S, n_params) (laplace-torch's
        ``sample``); ``generator`` as in :meth:`functional_samples`. Only ExactLLA has a
        weight-space posterior."""
        self._check_fitted()
        if int(n_samples) < 1:
            raise ValueError(f"fastlla: n_samples must be at least 1, got {n_samples}")
        return self._weight_samples(int(n_samples), self._rng(generator))

    def _weight_samples(self, n_samples: int, generator: torch.Generator) -> Tensor:
        raise NotImplementedError(
            f"fastlla: {type(self).__name__}'s posterior is over the features of its surrogate "
            "kernel, not the network's weights: there are no weight samples. Use "
            "functional_samples(x) for draws of the linearized network's outputs"
        )

    def _nn_functional_samples(
        self, x: Any, n_samples: int, generator: torch.Generator, fitting: bool
    ) -> Tensor:
        """The ``"nn"`` draws (S, B, C); without weight samples, the ``"glm"`` ones."""
        mean, cov = self.predictive_distribution(x, fitting=fitting)
        return gaussian_samples(mean, cov, n_samples, generator)

    def functional_variance(self, Js: Tensor) -> Tensor:
        """``Js P⁻¹ Jsᵀ`` per input, (B, C, C), for Jacobians ``Js`` (B, C, n_params) of the
        outputs with respect to the posterior's parameters (laplace-torch's; see
        :meth:`jacobians`: ExactLLA's weights, ScaLLA's ``M`` feature weights)."""
        return self._jacobian_covariance(self._checked_jacobians(Js))

    def functional_covariance(self, Js: Tensor) -> Tensor:
        """The joint ``Js P⁻¹ Jsᵀ`` over the batch, (B·C, B·C), index ``b·C + c``."""
        B, C, P = self._checked_jacobians(Js).shape
        return self._jacobian_covariance(Js.reshape(1, B * C, P))[0]

    def jacobians(self, x: Any) -> tuple[Tensor, Tensor]:
        """``(Js, f)``: the Jacobians (B, C, n_params) of the outputs with respect to the
        posterior's parameters, and the outputs (B, C) (laplace-torch's
        ``la.backend.jacobians(x)``). ScaLLA's posterior is over the weights ``w`` of
        ``f(x) + g(x)ᵀw``: its ``Js`` is ``g(x)ᵀ``, the surrogate's features."""
        x = self._prediction_inputs(x)
        if batch_size(x) == 0:
            C, kw = self.n_outputs, {"dtype": self.dtype, "device": self.device}
            return torch.empty(0, C, self.n_params, **kw), torch.empty(0, C, **kw)
        return self._jacobians_and_outputs(x)

    def _checked_jacobians(self, Js: Any) -> Tensor:
        self._check_fitted()
        if not isinstance(Js, Tensor) or Js.dim() != 3 or Js.shape[-1] != self.n_params:
            shape = tuple(Js.shape) if isinstance(Js, Tensor) else type(Js).__name__
            raise ValueError(
                f"fastlla: Js must be a (batch, outputs, {self.n_params}) tensor, got {shape}"
            )
        return Js.to(self.device, self.dtype)

    def _jacobian_covariance(self, J: Tensor, diagonal: bool = False) -> Tensor:
        """``J P⁻¹ Jᵀ`` (B, C, C) (``diagonal``: its diagonal, (B, C)) at the current ``δ``,
        ``σ``, for a scalar ``δ`` and a feature posterior; ExactLLA overrides."""
        op = self.posterior.variance if diagonal else self.posterior.covariance
        return op(J.mT.contiguous(), self._delta(), self.data_scale)

    def _outputs_and_variance(self, x: Any, delta: Any, scale: float) -> tuple[Tensor, Tensor]:
        """``f(x)`` (B, C) and the predictive variances (B, C) without ``C×C`` blocks."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _outputs_and_joint_covariance(
        self, x: Any, delta: Any, scale: float
    ) -> tuple[Tensor, Tensor]:
        """``f(x)`` (B, C) and the joint covariance (B·C, B·C)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _jacobians_and_outputs(self, x: Any) -> tuple[Tensor, Tensor]:
        raise NotImplementedError  # pragma: no cover - abstract

    # ------------------------------------------------------------------ the posterior
    # laplace-torch's properties. The posterior is over ``n_params`` dimensions: ExactLLA's
    # chosen weights; ScaLLA's ``M`` feature weights ``w`` of ``f(x) + g(x)ᵀw`` (centred at 0).
    @property
    def mean(self) -> Tensor:
        """The posterior mean (n_params,): ``θ*`` (ExactLLA), zeros (ScaLLA)."""
        self._check_fitted()
        return self._posterior_mean()

    def _posterior_mean(self) -> Tensor:
        return torch.zeros(self.n_params, dtype=self.dtype, device=self.device)

    def _posterior_ggn(self) -> Tensor:
        """The data term ``G`` (n_params, n_params) of the posterior precision ``sG + D``."""
        return self.posterior.H

    def _prior_diagonal(self) -> Tensor:
        """``D``'s diagonal (n_params,), float64."""
        d = self._prior_precision
        return d.expand(self.n_params) if d.numel() == 1 else self._expand_prior(d)

    @property
    def posterior_precision(self) -> Tensor:
        """``P = s·G + D`` (n_params, n_params): ``s = 1/(σ²T)`` (``1/T`` for classification),
        ``G`` the GGN, ``D`` the diagonal prior precision; the model's dtype."""
        self._check_fitted()
        G = self._posterior_ggn()
        return self.data_scale * G + torch.diag(self._prior_diagonal().to(G.dtype))

    @property
    def posterior_scale(self) -> Tensor:
        """Lower-triangular ``S`` with ``SSᵀ = P⁻¹`` (n_params, n_params), laplace-torch's
        (torch's ``_precision_to_scale_tril``): the factor :meth:`sample` uses."""
        return precision_to_scale_tril(self.posterior_precision)

    @property
    def posterior_covariance(self) -> Tensor:
        """``P⁻¹ = SSᵀ`` (n_params, n_params)."""
        S = self.posterior_scale
        return S @ S.mT

    @property
    def log_det_prior_precision(self) -> Tensor:
        """``log det D`` over the ``n_params`` dimensions (float64)."""
        self._check_fitted()
        return self._prior_diagonal().log().sum()

    @property
    def log_det_posterior_precision(self) -> Tensor:
        """``log det P = log det D + log det(I + sD⁻¹G)`` (float64, from the eigenvalues of
        ``G`` for a scalar ``δ``)."""
        return self.log_det_ratio + self.log_det_prior_precision

    @property
    def prior_precision_diag(self) -> Tensor:
        """``D``'s diagonal (n_params,), float64: ``δ`` expanded per parameter."""
        return self._prior_diagonal().clone()

    def square_norm(self, value: Tensor) -> Tensor:
        """``(v − mean)ᵀ P (v − mean)`` for ``value`` (n_params,) (laplace-torch's)."""
        P = self.posterior_precision
        delta = value.to(P.dtype) - self.mean
        return delta @ P @ delta

    def log_prob(self, value: Tensor, normalized: bool = True) -> Tensor:
        """``log N(value; mean, P⁻¹)`` (laplace-torch's); ``normalized=False``: only the terms
        that depend on ``value``, ``−½ square_norm(value)``."""
        if not normalized:
            return -self.square_norm(value) / 2
        return (
            -self.n_params / 2 * math.log(2 * math.pi)
            + self.log_det_posterior_precision / 2
            - self.square_norm(value) / 2
        )

    @property
    def scatter(self) -> Tensor:
        """``θ*ᵀDθ*`` (float64), the evidence's prior term. ScaLLA's evidence is the network's:
        ``δ‖θ*‖²`` over the network's weights."""
        self._check_fitted()
        return self._scatter(self._prior_precision)
