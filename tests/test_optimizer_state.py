"""Reading optimizer state: the family from real PyTorch optimizers, and the id -> name mapping
with and without `param_names`, with frozen and tied parameters, the Trainer and timm splits,
and ambiguous layouts that must not be guessed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from bnwd_cli.checkpoints.safe_load import load_torch_file
from bnwd_cli.metrics.dynamics import analyze_run
from bnwd_cli.metrics.optimizer import (
    LayoutHint,
    NameMapping,
    OptimizerFamily,
    detect_family,
    read_optimizer_state,
)

FIXTURES = Path(__file__).parent / "fixtures"


def stepped(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """One real step on a random batch, then the optimizer's state dict."""
    x = torch.randn(4, 3)
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()
    return optimizer.state_dict()


def small() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))


FAMILIES: list[tuple[str, Callable[[Any], torch.optim.Optimizer], OptimizerFamily]] = [
    ("sgd", lambda p: torch.optim.SGD(p, lr=0.1), OptimizerFamily.SGD),
    ("sgdm", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), OptimizerFamily.SGD_MOMENTUM),
    (
        "nesterov",
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
        OptimizerFamily.NESTEROV,
    ),
    ("adam", lambda p: torch.optim.Adam(p, weight_decay=0.1), OptimizerFamily.ADAM),
    ("adamw", lambda p: torch.optim.AdamW(p), OptimizerFamily.ADAMW),
    (
        "adam-decoupled",
        lambda p: torch.optim.Adam(p, weight_decay=0.1, decoupled_weight_decay=True),
        OptimizerFamily.ADAMW,
    ),
    ("nadam", lambda p: torch.optim.NAdam(p), OptimizerFamily.UNKNOWN),
    ("radam", lambda p: torch.optim.RAdam(p), OptimizerFamily.UNKNOWN),
    ("rmsprop", lambda p: torch.optim.RMSprop(p, momentum=0.9), OptimizerFamily.UNKNOWN),
    ("adagrad", lambda p: torch.optim.Adagrad(p), OptimizerFamily.UNKNOWN),
]


@pytest.mark.parametrize(("label", "make", "family"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_of_real_optimizers(
    label: str, make: Callable[[Any], torch.optim.Optimizer], family: OptimizerFamily
) -> None:
    model = small()
    state = stepped(model, make(model.parameters()))
    found, notes = detect_family(state)
    assert found is family
    if family is OptimizerFamily.UNKNOWN:
        expected = {"nadam": "NAdam", "radam": "RAdam", "rmsprop": "RMSprop", "adagrad": "Adagrad"}
        assert f"looks like {expected[label]}" in notes[0]


def test_adam_and_adamw_without_the_flag_are_reported_as_indistinguishable() -> None:
    model = small()
    state = stepped(model, torch.optim.AdamW(model.parameters(), weight_decay=0.05))
    for group in state["param_groups"]:
        del group["decoupled_weight_decay"]  # what torch < 2.6 wrote
    family, notes = detect_family(state)
    assert family is OptimizerFamily.ADAM_OR_ADAMW
    assert "--optimizer" in notes[0]
    assert detect_family(state, OptimizerFamily.ADAMW)[0] is OptimizerFamily.ADAMW
    for group in state["param_groups"]:
        group["weight_decay"] = 0.0
    assert "behave the same" in detect_family(state)[1][0]


def test_user_hint_that_contradicts_the_state_is_noted() -> None:
    model = small()
    state = stepped(model, torch.optim.AdamW(model.parameters()))
    family, notes = detect_family(state, OptimizerFamily.SGD_MOMENTUM)
    assert family is OptimizerFamily.SGD_MOMENTUM
    assert "AdamW" in notes[0] and "using --optimizer" in notes[0]


def test_lion_state_is_recognized() -> None:
    state = {
        "state": {0: {"exp_avg": torch.zeros(2, 3)}},
        "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.1, "params": [0]}],
    }
    assert detect_family(state)[0] is OptimizerFamily.LION


def params_of(model: nn.Module, prefix: str = "") -> list[tuple[str, tuple[int, ...]]]:
    return [(prefix + n, tuple(p.shape)) for n, p in model.named_parameters()]


def test_param_names_resolve_through_prefixes() -> None:
    # A Lightning module keeps its network as `self.net`; the weights lose the `net.` prefix
    # and a DDP wrapper adds `module.`, but the optimizer recorded the training module's names.
    torch.manual_seed(0)

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = small()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    wrapper = Wrapper()
    decayed = [(n, p) for n, p in wrapper.named_parameters() if n.endswith("weight")]
    others = [(n, p) for n, p in wrapper.named_parameters() if n.endswith("bias")]
    optimizer = torch.optim.SGD(
        [{"params": decayed, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
        lr=0.1,
        momentum=0.9,
    )
    state = stepped(wrapper, optimizer)
    for group in state["param_groups"]:
        group["param_names"] = ["module." + n for n in group["param_names"]]
    snapshot = read_optimizer_state(state, params_of(wrapper.net))
    assert snapshot.mapping is NameMapping.PARAM_NAMES
    assert {n: h.weight_decay for n, h in snapshot.per_param.items()} == {
        "0.weight": 0.1,
        "2.weight": 0.1,
        "0.bias": 0.0,
        "2.bias": 0.0,
    }


def test_recorded_name_with_the_wrong_shape_is_left_unmapped() -> None:
    model = small()
    state = stepped(model, torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9))
    names = state["param_groups"][0]["param_names"]
    names[0], names[2] = names[2], names[0]  # 0.weight (5,3) <-> 2.weight (2,5)
    snapshot = read_optimizer_state(state, params_of(model))
    assert set(snapshot.per_param) == {"0.bias", "2.bias"}
    assert set(snapshot.unmapped_ids) == {0, 2}
    assert any("left unmapped" in note for note in snapshot.notes)


def saved_and_read(state: dict[str, Any], directory: Path) -> dict[str, Any]:
    """`state` as a checkpoint gives it to bnwd: through `torch.save`, with numpy buffers."""
    path = directory / "optimizer.pt"
    torch.save(state, path)
    loaded = load_torch_file(path)
    buffer = loaded["state"][0]["momentum_buffer"]
    assert isinstance(buffer, np.ndarray)  # the case is what it says
    return loaded


@pytest.mark.parametrize("source", ["torch", "checkpoint"])
def test_order_without_names_is_checked_against_shapes(source: str, tmp_path: Path) -> None:
    # API callers pass `opt.state_dict()` (torch tensors); checkpoints give numpy arrays
    model = small()
    state = stepped(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    if source == "checkpoint":
        state = saved_and_read(state, tmp_path)
    snapshot = read_optimizer_state(state, params_of(model))
    assert snapshot.mapping is NameMapping.ORDER_VERIFIED
    assert snapshot.id_to_name == {0: "0.weight", 1: "0.bias", 2: "2.weight", 3: "2.bias"}
    # plain SGD keeps no state: the order is used, and said to be unchecked
    plain = stepped(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert read_optimizer_state(plain, params_of(model)).mapping is NameMapping.ORDER_UNVERIFIED
    # a wrong order is refused, not guessed
    swapped = params_of(model)
    swapped[0], swapped[2] = swapped[2], swapped[0]
    refused = read_optimizer_state(state, swapped)
    assert refused.mapping is NameMapping.AMBIGUOUS
    assert refused.per_param == {}


def test_frozen_parameter_settled_by_shapes() -> None:
    model = small()
    model[0].bias.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = stepped(model, torch.optim.SGD(trainable, lr=0.1, momentum=0.9))
    snapshot = read_optimizer_state(state, params_of(model))
    assert snapshot.mapping is NameMapping.ORDER_VERIFIED
    assert snapshot.id_to_name == {0: "0.weight", 1: "2.weight", 2: "2.bias"}
    assert any("holds 3 parameters, the model 4" in note for note in snapshot.notes)


def test_frozen_parameter_among_equal_shapes_is_ambiguous() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = stepped(model, torch.optim.SGD(trainable, lr=0.1, momentum=0.9))
    snapshot = read_optimizer_state(state, params_of(model))
    assert snapshot.mapping is NameMapping.AMBIGUOUS
    # id 2 (a 4x4 weight) could be 1.weight or 2.weight; the ids whose place is forced stay
    assert snapshot.unmapped_ids == (2,)
    assert snapshot.id_to_name == {0: "0.weight", 1: "0.bias"}
    assert set(snapshot.per_param) == {"0.weight", "0.bias"}
    assert any("ambiguous" in note for note in snapshot.notes)


def test_two_groups_of_identical_shapes_are_ambiguous() -> None:
    layers = [nn.Linear(4, 4, bias=False) for _ in range(4)]
    model = nn.Sequential(*layers)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(
        [
            {"params": [params[1], params[3]], "weight_decay": 0.1},
            {"params": [params[0], params[2]], "weight_decay": 0.0},
        ],
        lr=0.1,
        momentum=0.9,
    )
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    snapshot = read_optimizer_state(optimizer.state_dict(), params_of(model))
    assert snapshot.mapping is NameMapping.AMBIGUOUS
    assert snapshot.per_param == {}


def test_groups_each_in_order_with_a_frozen_head() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 36, 10),
    )
    for p in model[4].parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.SGD(
        [
            {"params": [model[0].weight], "weight_decay": 5e-4},
            {"params": [model[1].weight, model[1].bias], "weight_decay": 0.0},
        ],
        lr=0.1,
        momentum=0.9,
    )
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    optimizer.step()
    snapshot = read_optimizer_state(optimizer.state_dict(), params_of(model))
    assert snapshot.mapping is NameMapping.ORDER_VERIFIED
    assert snapshot.per_param["0.weight"].weight_decay == 5e-4
    assert snapshot.per_param["1.weight"].weight_decay == 0.0
    assert snapshot.per_param["1.bias"].weight_decay == 0.0


class TinyLM(nn.Module):
    """Embedding -> LayerNorm -> Linear head tied to the embedding (GPT-2 style)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.ln_f = nn.LayerNorm(4)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.ln_f(self.embed(tokens))))


def trainer_groups(model: nn.Module, wd: float) -> list[dict[str, Any]]:
    """What `Trainer.create_optimizer` builds: decayed = outside nn.LayerNorm and no bias/norm
    in the name (transformers' get_decay_parameter_names), in named_parameters() order."""
    import re

    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    in_ln = {
        f"{m}.{n}"
        for m, module in model.named_modules()
        if isinstance(module, nn.LayerNorm)
        for n, _ in module.named_parameters()
    }
    decay = [
        n
        for n, _ in model.named_parameters()
        if n not in in_ln and not any(re.search(p, n.lower()) for p in patterns)
    ]
    return [
        {"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": wd},
        {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0},
    ]


def test_trainer_split_and_tied_head_through_a_saved_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = torch.optim.AdamW(trainer_groups(model, 0.01), lr=1e-3)
    tokens = torch.randint(0, 7, (3, 5))
    for step in (1, 2):
        optimizer.zero_grad()
        model(tokens).square().mean().backward()
        optimizer.step()
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step},
            tmp_path / f"step_{step}.pt",
        )
    report = analyze_run(tmp_path)
    info = report.checkpoints[-1]
    # each group is in parameter order, which the shapes settle (the Trainer split agrees)
    assert info.name_mapping is NameMapping.ORDER_VERIFIED
    decay = {layer.name: layer.points[-1].weight_decay for layer in report.layers}
    # embed.weight and proj.weight decayed; the LayerNorm (ln_f, caught by its type) and the
    # bias not; head.weight is the tied embedding, so it shares embed.weight's settings
    assert decay == {
        "embed.weight": 0.01,
        "ln_f.weight": 0.0,
        "ln_f.bias": 0.0,
        "proj.weight": 0.01,
        "proj.bias": 0.0,
        "head.weight": 0.01,
    }


def test_trainer_split_from_the_real_trainer_fixture() -> None:
    # tests/fixtures/hf_trainer_run was written by transformers' Trainer (BatchNorm net):
    # the Trainer decays BatchNorm gammas (not LayerNorm, no 'norm' in `net.1.weight`)
    report = analyze_run(FIXTURES / "hf_trainer_run")
    assert report.checkpoints[-1].name_mapping is NameMapping.TRAINER_SPLIT
    decay = {layer.name: layer.points[-1].weight_decay for layer in report.layers}
    assert decay == {
        "net.0.weight": 0.01,
        "net.1.weight": 0.01,
        "net.1.bias": 0.0,
        "net.3.weight": 0.01,
        "net.3.bias": 0.0,
        "net.4.weight": 0.01,
        "net.4.bias": 0.0,
        "net.8.weight": 0.01,
        "net.8.bias": 0.0,
    }


def test_timm_split_from_the_real_timm_fixture() -> None:
    # timm's param_groups_weight_decay: group 0 (no decay) = 1-D params and biases
    report = analyze_run(FIXTURES / "timm_run")
    assert report.checkpoints[-1].name_mapping is NameMapping.TIMM_SPLIT
    assert report.optimizer_family is OptimizerFamily.NESTEROV
    decay = {layer.name: layer.points[-1].weight_decay for layer in report.layers}
    assert decay == {
        "0.weight": 5e-4,
        "1.weight": 0.0,
        "1.bias": 0.0,
        "3.weight": 5e-4,
        "3.bias": 0.0,
        "4.weight": 0.0,
        "4.bias": 0.0,
        "8.weight": 5e-4,
        "8.bias": 0.0,
    }


def test_agreeing_layouts_take_the_hinted_label() -> None:
    # Shapes settle this Trainer split under plain "each group in order" too: both agree
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    state = stepped(model, torch.optim.AdamW(trainer_groups(model, 0.1)))
    ln = {"1.weight", "1.bias"}
    plain = read_optimizer_state(state, params_of(model), layernorm_params=ln)
    hinted = read_optimizer_state(
        state, params_of(model), layernorm_params=ln, layout_hint=LayoutHint.TRANSFORMERS_TRAINER
    )
    assert plain.mapping is NameMapping.ORDER_VERIFIED
    assert hinted.mapping is NameMapping.TRAINER_SPLIT
    expected = {0: "0.weight", 1: "2.weight", 2: "0.bias", 3: "1.weight", 4: "1.bias", 5: "2.bias"}
    assert plain.id_to_name == hinted.id_to_name == expected


def test_layout_hint_breaks_a_tie_between_fitting_layouts() -> None:
    # Linear -> BatchNorm1d -> Linear with the Trainer split: the decayed group holds a (4,)
    # tensor that, by shape alone, could be 0.bias, 1.weight or 1.bias.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    state = stepped_batch(model, torch.optim.AdamW(trainer_groups(model, 0.1)))
    plain = read_optimizer_state(state, params_of(model))
    assert plain.mapping is NameMapping.AMBIGUOUS
    assert any("more than one assignment" in n for n in plain.notes)
    # only what every fitting assignment agrees on is kept
    assert plain.id_to_name == {0: "0.weight", 2: "2.weight", 5: "2.bias"}
    hinted = read_optimizer_state(
        state, params_of(model), layout_hint=LayoutHint.TRANSFORMERS_TRAINER
    )
    assert hinted.mapping is NameMapping.TRAINER_SPLIT
    assert hinted.id_to_name == {
        0: "0.weight",
        1: "1.weight",
        2: "2.weight",
        3: "0.bias",
        4: "1.bias",
        5: "2.bias",
    }
    assert any("Transformers Trainer, so its decay/no-decay split" in n for n in hinted.notes)


def stepped_batch(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    optimizer.zero_grad()
    model(torch.randn(8, 3)).square().mean().backward()
    optimizer.step()
    return optimizer.state_dict()
