"""Diagnosis: is the surrogate limited by the noise of its projected targets, or by itself?

Removes the target noise entirely: the learned features are trained on *exact* targets, the
parameter-subspace features ``T(x) = Qᵀ J_rest(x)ᵀ`` (``r × C``), where ``Q`` holds the top-``r``
right singular vectors of the training Jacobian of every parameter except the last layer's
(whose block ScaLLA carries exactly). ``[T(x); exact last-layer block]`` itself is the ceiling of
this experiment (its held-out error is printed first). The learned surrogate is trained by Gram
matching on ``T`` (``--loss gram``, the ScaLLA loss with noise-free targets) or by regression
(``--loss mse``), and the held-out kernel error of ``[learned; exact block]`` against the exact
NTK Gram of the 200 probe images is printed, with the surrogate's error on the training
targets.

    python bench/fidelity/subspace_distill.py --seconds 90                  # ScaLLA's surrogate
    python bench/fidelity/subspace_distill.py --seconds 120 --width 512     # wider bottleneck
    python bench/fidelity/subspace_distill.py --seconds 120 --width 512 --shift

``--width H`` replaces the surrogate's copy of the network's 48-unit penultimate layer by a new
``Linear(128 → H) · ReLU`` (the convolutions stay warm-started copies); ``--shift`` adds the
eight 1-pixel (cyclic) shifts of every training image, with their own exact targets.
Forms Jacobians: a diagnostic for this small CNN (P = 11,482), not a method. Results:
``bench/fidelity/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from torch import nn

from fastlla.apps.fidelity import feature_rows, setup
from fastlla.functional import NetworkFunction
from fastlla.surrogate import GatedSurrogate, last_layer_surrogate


class WideSurrogate(nn.Module):
    """The network's convolutions (warm copies) and a new ``Linear(128 → width) · ReLU`` trunk
    end, then a linear head to ``r × C`` features."""

    def __init__(self, model: nn.Module, width: int, r: int, C: int):
        super().__init__()
        self.conv = copy.deepcopy(model.trunk[:7])  # conv · relu · pool · conv · relu · pool · flat
        for p in self.conv.parameters():
            p.requires_grad_(True)
        self.mlp = nn.Sequential(nn.Linear(128, width), nn.ReLU(), nn.Linear(width, r * C))
        self.register_buffer("output_scale", torch.ones(()))
        self.r, self.C = r, C

    def forward(self, x):
        x = x.reshape(-1, 1, 8, 8)
        return (self.mlp(self.conv(x)) * self.output_scale).view(x.shape[0], self.r, self.C)


class MLPHeadSurrogate(nn.Module):
    """ScaLLA's default surrogate (warm trunk copy, 48-unit penultimate) with a hidden layer in
    its head: ``Linear(48 → width) · ReLU · Linear(width → r·C)``."""

    def __init__(self, default: nn.Module, width: int, r: int, C: int):
        super().__init__()
        self.trunk = default.trunk
        self.head = nn.Sequential(
            nn.Linear(default.head.in_features, width), nn.ReLU(), nn.Linear(width, r * C)
        )
        self.register_buffer("output_scale", torch.ones(()))
        self.r, self.C = r, C

    def forward(self, x):
        h = self.trunk(x).reshape(x.shape[0], -1)
        return (self.head(h) * self.output_scale).view(x.shape[0], self.r, self.C)


class TwoLevelGatedSurrogate(nn.Module):
    """:class:`fastlla.surrogate.GatedSurrogate` (``--gated 1``) one level further down (this
    CNN only): the convolutions reach ``z`` through ``W_fc`` and the pooled ReLU gate
    ``(a > 0)``, both taken from the network exactly; the MLP learns ``128 × r`` per input."""

    def __init__(self, model: nn.Module, width: int, r: int):
        super().__init__()
        self.conv = copy.deepcopy(model.trunk[:7])
        for p in self.conv.parameters():
            p.requires_grad_(True)
        self.net_trunk = model.trunk  # frozen network: the gates
        self.register_buffer("w_head", model.head.weight.detach().clone())
        self.register_buffer("w_fc", model.trunk[7].weight.detach().clone())
        hidden = self.w_head.shape[1]
        self.skip = nn.Linear(128, hidden * r)
        self.mlp = nn.Sequential(nn.Linear(128, width), nn.ReLU(), nn.Linear(width, 128 * r))
        self.register_buffer("output_scale", torch.ones(()))
        self.r, self.hidden = r, hidden

    def forward(self, x):
        x = x.reshape(-1, 1, 8, 8)
        a = self.conv(x)
        with torch.no_grad():
            a_net = self.net_trunk[:7](x)
            gate = (self.net_trunk[7](a_net) > 0).to(a.dtype)  # relu'(z) of the network
        G = self.mlp(a).view(-1, 128, self.r) * (a_net > 0).to(a.dtype)[:, :, None]
        H = self.skip(a).view(-1, self.hidden, self.r) + torch.einsum("jk,bkm->bjm", self.w_fc, G)
        return torch.einsum("bjm,bj,cj->bmc", H, gate, self.w_head) * self.output_scale


def jacobian(net: NetworkFunction, x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return torch.cat([net.jacobian(x[a : a + 64]) for a in range(0, x.shape[0], 64)])[:, :, cols]


def shifted(x: torch.Tensor) -> torch.Tensor:
    img = x.reshape(-1, 1, 8, 8)
    out = [img] + [
        torch.roll(img, (dx, dy), (2, 3)) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy
    ]
    return torch.cat(out).reshape(-1, *x.shape[1:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", choices=["gram", "mse"], default="gram")
    parser.add_argument("--seconds", type=float, default=90.0, help="training wall-clock budget")
    parser.add_argument("--rank", type=int, default=100, help="r = M learned features")
    parser.add_argument("--width", type=int, default=0, help="0: ScaLLA's default surrogate")
    parser.add_argument("--head-width", type=int, default=0,
                        help="a hidden layer of this width in the default surrogate's head")
    parser.add_argument("--gated", type=int, default=0,
                        help="1: fastlla's GatedSurrogate (MLP width --width); 2: also the next level's gates")
    parser.add_argument("--shift", action="store_true", help="add 1-pixel shifted images")
    parser.add_argument("--exact-fc", action="store_true",
                        help="carry the penultimate Linear layer's Jacobian block exactly too "
                        "(the learned features then target the convolutions only)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    r = args.rank
    ds, model, probe = setup()
    net = NetworkFunction(model)
    X = shifted(ds.x_train) if args.shift else ds.x_train  # the originals come first
    N = X.shape[0]
    exact = ("head.", "trunk.7.") if args.exact_fc else ("head.",)
    rest = [i for i, n in enumerate(net.names) if not n.startswith(exact)]
    fc = [i for i, n in enumerate(net.names) if n.startswith("trunk.7.")]
    starts = [sum(net.numels[:i]) for i in range(len(net.numels) + 1)]
    cols = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in rest])
    t0 = time.time()
    J = jacobian(net, X, cols)  # (N, C, P_rest)
    C = J.shape[1]
    _, S, V = torch.svd_lowrank(J.reshape(-1, J.shape[-1]), q=r + 20, niter=4)
    Q = V[:, :r]
    T = torch.einsum("ncp,pr->nrc", J, Q)  # exact targets (N, r, C)
    del J
    print(f"setup {time.time() - t0:.1f} s: N = {N}, P_rest = {len(cols)}, σ_r/σ_1 = "
          f"{float(S[r - 1] / S[0]):.3g}")  # fmt: skip
    sur = last_layer_surrogate(model, r, C, net.n_params)
    with torch.no_grad():
        exact_p = sur.exact_features(probe.x)
        if args.exact_fc:  # the full fc block, rows (p, c) → features (B, P_fc, C)
            fc_cols = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in fc])
            exact_p = torch.cat([exact_p, jacobian(net, probe.x, fc_cols).mT], 1)
        T_p = torch.einsum("ncp,pr->nrc", jacobian(net, probe.x, cols), Q)
    print(f"ceiling (exact subspace features + exact block): held-out error "
          f"{probe.error(torch.cat([T_p, exact_p], 1)):.4f}; floor(100) {probe.floor(100):.4f}")  # fmt: skip
    learned = sur.learned
    if args.gated == 1:
        learned = GatedSurrogate(model, r, C, args.width or 512)
    elif args.gated == 2:
        learned = TwoLevelGatedSurrogate(model, args.width or 512, r)
    elif args.width:
        learned = WideSurrogate(model, args.width, r, C)
    elif args.head_width:
        learned = MLPHeadSurrogate(sur.learned, args.head_width, r, C)
    with torch.no_grad():
        learned.output_scale.mul_(T.std() / learned(X[:256]).std())
    opt = torch.optim.Adam(learned.parameters(), lr=1e-3)
    first = torch.arange(min(200, N))
    target_gram = feature_rows(T[first].double()) @ feature_rows(T[first].double()).mT

    def report(label: str) -> float:
        with torch.no_grad():
            err = probe.error(torch.cat([learned(probe.x), exact_p], 1))
            f = feature_rows(learned(X[first]).double())
            train = float(torch.linalg.norm(f @ f.mT - target_gram) / torch.linalg.norm(target_gram))
        print(f"{label}: held-out error {err:.4f}; training-target Gram error {train:.4f}", flush=True)
        return err

    step, t0, last = 0, time.time(), -math.inf
    while (elapsed := time.time() - t0) < args.seconds:
        for group in opt.param_groups:  # cosine decay over the wall-clock budget
            group["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * elapsed / args.seconds))
        idx = torch.randint(0, N, (args.batch_size,))
        phi = learned(X[idx])
        if args.loss == "mse":
            loss = (phi - T[idx]).square().mean()
        else:
            rows, target = feature_rows(phi), feature_rows(T[idx])
            loss = (rows @ rows.mT - target @ target.mT).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if elapsed - last > args.seconds / 6:
            last = elapsed
            report(f"{elapsed:6.0f} s, step {step}")
    err = report(f"final ({args.loss}, r = {r}, width = {args.width or 'default'}, "
                 f"head width = {args.head_width or '-'}, shift = {args.shift}, {step} steps, {args.seconds:.0f} s)")  # fmt: skip
    print(f"×floor(100) = {err / probe.floor(100):.2f}")


if __name__ == "__main__":
    main()
