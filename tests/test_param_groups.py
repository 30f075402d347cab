"""`bnwd_cli.param_groups` (defined in `bnwd_cli.groups`): groups built from the graph analysis of hand-built models, used by
a real optimizer, and read back from its state by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnwd_cli
from bnwd_cli.errors import UsageError
from bnwd_cli.graph.classes import ParamKind
from bnwd_cli.groups import GroupRole, InvariantPolicy, ParamGroups, param_groups
from bnwd_cli.metrics.optimizer import NameMapping, read_optimizer_state


class Net(nn.Module):
    """BatchNorm convs (one with a dead bias), a Linear+bias before LayerNorm, a plain head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.ln(self.fc(x.mean(dim=(2, 3)))))
        return self.head(x)


X = torch.randn(4, 3, 8, 8)
EXPECTED = {
    # BatchNorm-preceded conv weights, and the Linear weight+bias before LayerNorm (joint)
    GroupRole.SCALE_INVARIANT: ("conv1.weight", "conv2.weight", "fc.weight", "fc.bias"),
    # gamma/beta of the three norms, the dead conv2 bias, the head's bias
    GroupRole.NO_DECAY: (
        "bn1.weight",
        "bn1.bias",
        "conv2.bias",
        "bn2.weight",
        "bn2.bias",
        "ln.weight",
        "ln.bias",
        "head.bias",
    ),
    GroupRole.DECAY: ("head.weight",),
}


def names_by_role(groups: ParamGroups) -> dict[GroupRole, tuple[str, ...]]:
    """Names per group role, checking that the optimizer dicts and the summary agree."""
    specs = groups.summary.groups
    assert [tuple(g["param_names"]) for g in groups] == [s.param_names for s in specs]
    assert [g["weight_decay"] for g in groups] == [s.weight_decay for s in specs]
    return {spec.role: spec.param_names for spec in specs}


def test_groups_follow_the_graph_analysis() -> None:
    torch.manual_seed(0)
    model = Net()
    # the documented spelling, through the package's lazy export
    groups = bnwd_cli.param_groups(model, 5e-4, example_input=X)
    assert names_by_role(groups) == EXPECTED
    decay = {name: g["weight_decay"] for g in groups for name in g["param_names"]}
    assert decay["conv1.weight"] == 5e-4 and decay["fc.bias"] == 5e-4
    assert decay["bn1.weight"] == 0.0 and decay["head.bias"] == 0.0
    assert decay["head.weight"] == 5e-4
    params = dict(model.named_parameters())
    for g in groups:
        assert all(t is params[n] for t, n in zip(g["params"], g["param_names"], strict=True))
    summary = groups.summary
    assert summary.group(GroupRole.SCALE_INVARIANT).numel == 4 * 27 + 6 * 36 + 8 * 6 + 8
    kinds = {p.name: p.kind for p in summary.params}
    assert kinds["conv2.bias"] is ParamKind.DEAD_BIAS
    assert "scale_invariant: 4 tensors" in summary.describe()


def test_exclude_policy_zeroes_decay_on_invariant_weights() -> None:
    groups = param_groups(Net(), 1e-3, example_input=X, invariant_policy="exclude")
    invariant = groups.summary.group(GroupRole.SCALE_INVARIANT)
    assert invariant is not None and invariant.weight_decay == 0.0
    assert groups.summary.invariant_policy is InvariantPolicy.EXCLUDE
    assert any("effective LR decay" in n for n in groups.summary.notes)


def test_frozen_left_out_tied_listed_once() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 4)
            self.ln = nn.LayerNorm(4)
            self.out = nn.Linear(4, 5, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.out(self.ln(self.embed(t)))

    model = Tied()
    model.ln.bias.requires_grad_(False)
    groups = param_groups(model, 0.1, example_input=torch.randint(0, 5, (2, 3)))
    listed = [n for g in groups for n in g["param_names"]]
    assert sorted(listed) == ["embed.weight", "ln.weight"]
    assert any("1 frozen parameter" in n for n in groups.summary.notes)


def test_optimizer_state_records_the_names() -> None:
    torch.manual_seed(0)
    model = Net()
    groups = param_groups(model, 5e-4, example_input=X, extra={"scale_invariant": {"lr": 0.2}})
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    model(X).square().mean().backward()
    optimizer.step()
    state = optimizer.state_dict()
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    snapshot = read_optimizer_state(state, params)
    assert snapshot.mapping is NameMapping.PARAM_NAMES
    assert snapshot.per_param["fc.bias"].lr == 0.2  # the extra option of its group
    assert snapshot.per_param["head.weight"].lr == 0.1
    assert snapshot.per_param["bn2.bias"].weight_decay == 0.0


def test_bad_arguments_name_the_value() -> None:
    with pytest.raises(UsageError, match="invariant_policy 'sometimes'"):
        param_groups(Net(), 1e-3, example_input=X, invariant_policy="sometimes")
    with pytest.raises(UsageError, match="extra options for group 'heads'"):
        param_groups(Net(), 1e-3, example_input=X, extra={"heads": {"lr": 1.0}})
    with pytest.raises(UsageError, match="needs example_input="):
        param_groups(Net(), 1e-3)
    with pytest.raises(UsageError, match="weight_decay -1"):
        param_groups(Net(), -1, example_input=X)
