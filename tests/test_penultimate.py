"""Reading a network's penultimate features and its Jacobians without changing the network:
against values computed by hand, with the user's own hooks, nesting and tied weights; and the
exact last-layer block refusing a network whose output is not its last nn.Linear's."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastlla
from fastlla.functional import NetworkFunction
from fastlla.network_head import forward_with_penultimate, head_is_output, tapped_network
from testing import assert_close, oracle_jacobian

D, C = 5, 3


class Nested(nn.Module):
    """The head two levels down, an embedding layer used twice (tied), a user hook on the head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(D, 8)
        self.body = nn.Sequential(nn.Tanh(), nn.Linear(8, 8))
        self.out = nn.ModuleDict({"head": nn.Linear(8, C)})

    def forward(self, x):
        h = self.body(self.embed(x)) + self.embed(x)
        return self.out["head"](torch.relu(h))


def hooks(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def test_penultimate_features_against_a_hand_computation():
    torch.manual_seed(0)
    model = Nested().eval()
    calls = []
    model.out["head"].register_forward_pre_hook(lambda mod, args: calls.append(1))
    before = hooks(model)
    x = torch.randn(6, D)
    with torch.no_grad():
        h = torch.relu(model.body(model.embed(x)) + model.embed(x))
        expected = model.out["head"](h)
    n_calls = len(calls)
    out, psi = forward_with_penultimate(model, "out.head", x, bias=True, head_is_output=True)
    assert len(calls) == n_calls + 1  # the user's hook on the head ran, once
    assert hooks(model) == before
    assert_close(out, expected, torch.float32)
    assert_close(psi, torch.cat([h, torch.ones(6, 1)], 1), torch.float32)
    assert type(model.out["head"]) is nn.Linear and "forward" not in vars(model.out["head"])
    tapped, seen = tapped_network(model, ["embed", "body.1"])
    tapped(x)
    assert set(seen) == {"embed", "body.1"}  # the last of embed's two calls
    assert_close(seen["embed"][0], x, torch.float32)
    assert hooks(model) == before


def test_jacobian_of_a_tied_network_leaves_it_unchanged():
    torch.manual_seed(0)
    model = Nested().eval()
    x = torch.randn(4, D)
    params = {n: p for n, p in model.named_parameters()}
    J = NetworkFunction(model).jacobian(x)
    assert_close(J, oracle_jacobian(model, x), torch.float32)
    assert {n: p for n, p in model.named_parameters()} == params  # the same Parameter objects
    assert all(type(p) is nn.Parameter for p in model.parameters())


class Branching(nn.Module):
    """Returns its head's output halved for inputs far from the training data."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, C))

    def forward(self, x):
        out = self.net(x)
        return out if x.abs().max() < 10 else 0.5 * out


def fit_data():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(32, D, generator=g)
    return DataLoader(TensorDataset(X, (X[:, 0] > 0).long()), batch_size=16)


def test_exact_block_needs_the_head_to_give_the_output():
    torch.manual_seed(0)
    model = Branching().eval()
    x = torch.randn(4, D)
    assert head_is_output(model, "net.2", x) and not head_is_output(model, "net.2", 100 * x)
    assert not head_is_output(model, "net.0", x)
    loader = fit_data()
    la = fastlla.ScaLLA(model, "classification", n_features=4).fit(
        loader, iterations=2, progress_bar=False
    )
    assert la.last_layer_used is True
    la(x)
    with pytest.raises(ValueError, match="not the output of its module 'net.2'"):
        la(100 * x)  # the exact block's features would be those of the head, not of the output
    # a network that never returns its head's output: "auto" leaves the exact block out,
    # last_layer=True refuses at fit
    model = Halved().eval()
    la = fastlla.ScaLLA(model, "classification", n_features=4).fit(
        loader, iterations=2, progress_bar=False
    )
    assert la.last_layer_used is False and la.gate_used is False
    la(x)
    with pytest.raises(ValueError, match="needs the network to return the output"):
        fastlla.ScaLLA(model, "classification", n_features=4, last_layer=True).fit(
            loader, iterations=2, progress_bar=False
        )


class Halved(Branching):
    def forward(self, x):
        return 0.5 * self.net(x)


class SpareHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.net, self.spare = nn.Sequential(nn.Linear(D, 4), nn.Tanh()), nn.Linear(4, C)

    def forward(self, x):
        return self.net(x)


def test_a_head_that_does_not_run_is_an_error():
    with pytest.raises(ValueError, match="did not call its module 'spare'"):
        forward_with_penultimate(SpareHead(), "spare", torch.randn(2, D))
