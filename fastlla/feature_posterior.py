"""ScaLLA's last stage: the feature-space posterior, formed in one pass and updated with new data.

One pass over the training data accumulates the GGN of the surrogate's features
``H = Σ_n Φ_n Λ_n Φ_nᵀ`` (``fastlla::ggn_accumulate``; ``Λ_n`` the likelihood's Hessian in the
outputs) and the log-likelihood at ``θ*`` into a :class:`~fastlla.posterior.FeaturePosterior`;
:meth:`FeaturePosteriorPass.update` absorbs new data into it by rank-``k`` Cholesky updates
without revisiting the old. Under ``torch.distributed`` each rank reads its shard and ``H`` is
all-reduced (:mod:`fastlla.distributed`).

:class:`FeaturePosteriorPass` is a mixin of :class:`fastlla.ScaLLA`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import _ops, distributed
from .posterior import FeaturePosterior, compress_factor
from .predictive import Likelihood, softmax_hessian_factor
from .surrogate import check_surrogate_output, surrogate_features

__all__ = ["FeaturePosteriorPass"]


class FeaturePosteriorPass:
    """The posterior stage of :meth:`fastlla.ScaLLA.fit` and its streaming
    :meth:`update` (see the module docstring)."""

    def _fit_posterior(self, loader: Iterable, progress_bar: bool = False) -> None:
        M = self.n_features
        H = torch.zeros(M, M, dtype=self.dtype, device=self.device)
        classification = self.likelihood is Likelihood.CLASSIFICATION
        shard = distributed.shard(loader, "posterior")  # this rank's share (torch.distributed)
        fault = distributed.Fault("fit (posterior)")  # raised on every rank by the all-reduce
        with fault, torch.no_grad():
            for x, y in tqdm(self._batches(shard), disable=not progress_bar, desc="ScaLLA GGN"):
                f = self.network.output(x)
                self._accumulate_loglik(f, y)
                phi = self._surrogate_features(x)
                _ops.ggn_accumulate(H, phi.contiguous(), f if classification else None)
        distributed.all_reduce_posterior(self, H, fault.error, fault.what)
        self.posterior = FeaturePosterior(H)
        self._mark_fitted()

    def update(self, loader: Iterable, progress_bar: bool = False) -> FeaturePosteriorPass:
        """Absorb new data into the fitted posterior without refactorising or revisiting old data.

        Each batch contributes the factor ``W_n = Φ_n R_n`` (``R_n R_nᵀ = Λ_n``); ``H`` grows
        by ``WWᵀ`` and the cached Cholesky factor is updated in ``O(M²k)``
        (``fastlla::cholesky_update``), the log-likelihood statistics and ``n_data`` grow by the
        new data's. The surrogate is not retrained. The result equals a fit over old and new data
        with the same surrogate; :meth:`optimize_prior_precision` may be called again after it.

        Every batch is read and checked (inputs, targets against the likelihood, the number of
        outputs and features) before anything changes: a refused update leaves the estimator as
        it was. Under ``torch.distributed`` the loader is sharded as in :meth:`fit` and every rank
        absorbs all ranks' data.
        """
        self._check_fitted()
        error, W, stat, count = None, None, 0.0, 0
        try:
            shard = distributed.shard(loader, "posterior")
            W, stat, count = self._update_terms(shard, progress_bar)
        except (ValueError, TypeError, RuntimeError) as err:
            error = err
        distributed.agree(error, "update")  # every rank refuses if one does
        W = compress_factor(distributed.gather_columns(W))
        stat_t, count_t = distributed.sum_over_ranks(
            torch.tensor(stat, dtype=torch.float64), torch.tensor(float(count), dtype=torch.float64)
        )
        if int(count_t) == 0:
            raise ValueError("fastlla: the update loader is empty")
        self.posterior.update(W)
        self._loglik_stat += float(stat_t)
        self.n_data += int(round(float(count_t)))
        return self

    def _update_terms(self, loader: Iterable, progress_bar: bool) -> tuple[Tensor, float, int]:
        """``W`` (M, ≤ M columns), the log-likelihood statistic and the count of ``loader``."""
        classification = self.likelihood is Likelihood.CLASSIFICATION
        M, blocks, stat, count = self.n_features, [], 0.0, 0
        W = torch.zeros(M, 0, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for batch in tqdm(loader, disable=not progress_bar, desc="ScaLLA update"):
                checked = list(self._batches([batch], "loader", allow_empty=True))
                if not checked:  # a batch of no inputs
                    continue
                ((x, y),) = checked
                f = self.network.output(x)
                self._check_outputs(f, y)
                stat += self._loglik_term(f, y)
                count += f.shape[0]
                phi = check_surrogate_output(
                    surrogate_features(self.surrogate, x), x, self.n_outputs, M
                )
                if classification:
                    phi = phi @ softmax_hessian_factor(f)
                blocks.append(phi.permute(1, 0, 2).reshape(M, -1))
                if sum(b.shape[1] for b in blocks) > 2 * M:
                    W = compress_factor(torch.cat([W, *blocks], dim=1))
                    blocks = []
        return compress_factor(torch.cat([W, *blocks], dim=1)), stat, count
