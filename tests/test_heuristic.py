"""`graph.heuristic`: classification from the state dict alone, on state dicts of hand-built
`nn.Module`s (so key order, names and shapes are exactly what PyTorch writes). The expected
verdicts follow shared/THEORY.md section 1 for each architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bnwd_cli.graph.classes import (
    ClassificationMethod,
    Granularity,
    ModelClassification,
    ParamClassification,
    ParamKind,
)
from bnwd_cli.graph.heuristic import TensorEntry, classify_state_dict
from bnwd_cli.metrics.dynamics import analyze_run


def classify(model: nn.Module) -> ModelClassification:
    return classify_state_dict(
        [
            TensorEntry(name, tuple(t.shape), t.is_floating_point())
            for name, t in model.state_dict().items()
        ]
    )


def verdicts(model: nn.Module) -> dict[str, ParamClassification]:
    return classify(model).by_name()


def kinds(model: nn.Module) -> dict[str, ParamKind]:
    return {name: v.kind for name, v in verdicts(model).items()}


class ConvBN(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=bias)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def test_conv_to_batchnorm_is_per_row_invariant_and_head_is_sensitive() -> None:
    v = verdicts(ConvBN(bias=False))
    assert set(v) == {"conv.weight", "bn.weight", "bn.bias", "head.weight", "head.bias"}
    conv = v["conv.weight"]
    assert conv.kind is ParamKind.SCALE_INVARIANT
    assert conv.granularity is Granularity.PER_ROW
    assert conv.norm_layers == ("bn",)
    assert conv.shape == (8, 3, 3, 3)
    assert "bn" in conv.evidence and "8" in conv.evidence
    assert v["bn.weight"].kind is ParamKind.NORM_AFFINE
    assert v["bn.bias"].kind is ParamKind.NORM_AFFINE
    assert v["bn.weight"].norm_layers == ("bn",)
    assert v["head.weight"].kind is ParamKind.SCALE_SENSITIVE
    assert v["head.bias"].kind is ParamKind.SCALE_SENSITIVE


def test_conv_bias_before_batchnorm_is_dead() -> None:
    v = verdicts(ConvBN(bias=True))
    assert v["conv.bias"].kind is ParamKind.DEAD_BIAS
    assert v["conv.bias"].norm_layers == ("bn",)
    assert v["conv.weight"].kind is ParamKind.SCALE_INVARIANT
    assert v["conv.weight"].granularity is Granularity.PER_ROW


def test_buffers_are_not_classified_and_every_verdict_is_marked_heuristic() -> None:
    c = classify(ConvBN(bias=True))
    names = [p.name for p in c.params]
    assert names == ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "head.weight", "head.bias"]
    assert c.method is ClassificationMethod.HEURISTIC
    assert all(p.method is ClassificationMethod.HEURISTIC and p.evidence for p in c.params)
    assert any("--model" in note for note in c.notes)


class LinearLN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.out = nn.Linear(32, 4)


def test_linear_to_layernorm_in_same_parent_is_joint_with_its_bias() -> None:
    v = verdicts(LinearLN())
    weight, bias = v["fc.weight"], v["fc.bias"]
    assert weight.kind is ParamKind.SCALE_INVARIANT and bias.kind is ParamKind.SCALE_INVARIANT
    assert weight.granularity is Granularity.JOINT and bias.granularity is Granularity.JOINT
    assert weight.joint_group is not None and weight.joint_group == bias.joint_group
    assert v["norm.weight"].kind is ParamKind.NORM_AFFINE
    assert v["out.weight"].kind is ParamKind.SCALE_SENSITIVE


def test_linear_without_bias_to_layernorm_is_whole_tensor() -> None:
    model = nn.Module()
    model.fc = nn.Linear(16, 32, bias=False)
    model.ln = nn.LayerNorm(32)
    v = verdicts(model)["fc.weight"]
    assert v.kind is ParamKind.SCALE_INVARIANT and v.granularity is Granularity.WHOLE_TENSOR
    assert v.joint_group is None


def test_two_joint_groups_get_different_ids() -> None:
    model = nn.Module()
    model.a = LinearLN()
    model.b = LinearLN()
    v = verdicts(model)
    assert v["a.fc.weight"].joint_group == v["a.fc.bias"].joint_group
    assert v["b.fc.weight"].joint_group == v["b.fc.bias"].joint_group
    assert v["a.fc.weight"].joint_group != v["b.fc.weight"].joint_group


class Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)


class PreNormBlock(nn.Module):
    """x = x + attn(norm1(x)); x = x + mlp(norm2(x)): the residual add sits between every
    projection and the next norm, so nothing here is scale-invariant."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim)


def test_prenorm_transformer_projections_are_not_invariant() -> None:
    model = nn.Module()
    model.blocks = nn.Sequential(PreNormBlock(8), PreNormBlock(8))
    model.norm = nn.LayerNorm(8)
    model.head = nn.Linear(8, 3)
    v = verdicts(model)
    # attn.proj (8 rows) is followed in key order by norm2 (8 channels), and mlp.fc2 of block 0
    # by block 1's norm1: channel counts match, but the residual add is in between.
    for name in (
        "blocks.0.attn.proj.weight",
        "blocks.0.mlp.fc2.weight",
        "blocks.1.attn.proj.weight",
        "blocks.1.mlp.fc2.weight",
        "blocks.0.attn.qkv.weight",
        "head.weight",
    ):
        assert v[name].kind is ParamKind.SCALE_SENSITIVE, name
    for i in (0, 1):
        for norm in ("norm1", "norm2"):
            assert v[f"blocks.{i}.{norm}.weight"].kind is ParamKind.NORM_AFFINE
    assert v["norm.weight"].kind is ParamKind.NORM_AFFINE


@pytest.mark.parametrize("bias", [False, True])
def test_conv_to_groupnorm_named_gn(bias: bool) -> None:
    model = nn.Module()
    model.conv = nn.Conv2d(3, 16, 3, bias=bias)
    model.gn = nn.GroupNorm(4, 16)
    model.fc = nn.Linear(16, 2)
    v = verdicts(model)
    weight = v["conv.weight"]
    assert weight.kind is ParamKind.SCALE_INVARIANT
    assert weight.norm_layers == ("gn",)
    assert "GroupNorm" in weight.evidence
    if bias:
        # GroupNorm subtracts a mean across the channels of a group: the bias survives it
        assert weight.granularity is Granularity.JOINT
        assert v["conv.bias"].kind is ParamKind.SCALE_INVARIANT
        assert v["conv.bias"].joint_group == weight.joint_group
    else:
        assert weight.granularity is Granularity.PER_GROUP
    assert v["gn.weight"].kind is ParamKind.NORM_AFFINE
    assert "GroupNorm" in v["gn.weight"].evidence
    assert v["fc.weight"].kind is ParamKind.SCALE_SENSITIVE


def test_linear_to_batchnorm1d_is_per_row() -> None:
    model = nn.Sequential(nn.Linear(10, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    v = verdicts(model)
    assert v["0.weight"].kind is ParamKind.SCALE_INVARIANT
    assert v["0.weight"].granularity is Granularity.PER_ROW
    assert v["0.bias"].kind is ParamKind.DEAD_BIAS
    assert v["3.weight"].kind is ParamKind.SCALE_SENSITIVE


def test_channel_count_mismatch_is_not_invariant() -> None:
    # a conv whose next parametrized module is a BN of another width does not feed it
    model = nn.Module()
    model.conv = nn.Conv2d(3, 8, 3)
    model.bn = nn.BatchNorm2d(4)
    assert kinds(model)["conv.weight"] is ParamKind.SCALE_SENSITIVE
    assert kinds(model)["conv.bias"] is ParamKind.SCALE_SENSITIVE


def test_resnet_basic_block_naming() -> None:
    class BasicBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(8, 8, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 16, 3, bias=False)
            self.bn2 = nn.BatchNorm2d(16)
            self.downsample = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))

    model = nn.Module()
    model.layer1 = nn.Sequential(BasicBlock(), BasicBlock())
    model.fc = nn.Linear(16, 10)
    k = kinds(model)
    for i in (0, 1):
        for conv in ("conv1", "conv2", "downsample.0"):
            assert k[f"layer1.{i}.{conv}.weight"] is ParamKind.SCALE_INVARIANT
        for bn in ("bn1", "bn2", "downsample.1"):
            assert k[f"layer1.{i}.{bn}.weight"] is ParamKind.NORM_AFFINE
    assert k["fc.weight"] is ParamKind.SCALE_SENSITIVE


def deep_sequential() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()]
    for _ in range(4):
        layers += [nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()]
    layers += [nn.Flatten(), nn.Linear(4, 4)]
    return nn.Sequential(*layers)  # modules 0..16: more than ten, so "10" sorts before "2"


def test_safetensors_key_order_does_not_change_the_classification(tmp_path: Path) -> None:
    # safetensors stores keys sorted as strings; the module order must come out the same as
    # from torch.save, or conv 1x -> bn 1(x+1) pairs are lost.
    from safetensors.torch import save_file

    model = deep_sequential()
    expected = kinds(model)
    assert sum(k is ParamKind.SCALE_INVARIANT for k in expected.values()) == 5
    for fmt in ("torch", "safetensors"):
        folder = tmp_path / fmt
        folder.mkdir()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if fmt == "torch":
            torch.save(state, folder / "step_1.pt")
        else:
            save_file(state, str(folder / "step_1.safetensors"))
        report = analyze_run(folder)
        got = {layer.name: layer.classification.kind for layer in report.layers}
        assert got == expected, fmt


def test_safetensors_named_conv_bn_pair_is_found(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = ConvBN(bias=False)
    save_file(
        {k: v.clone() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors")
    )
    report = analyze_run(tmp_path / "m.safetensors")
    got = {layer.name: layer.classification.kind for layer in report.layers}
    assert got["conv.weight"] is ParamKind.SCALE_INVARIANT
