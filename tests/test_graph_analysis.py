"""Structural scale-invariance analysis (`bnwd_cli.graph.analyze`): one hand-built model per case
of the issue, each with its answer written down from the model's structure (the docstrings of
`tests/models/*.py` state them), never copied from the code's output.

Both ways of getting the graph are tested: `torch.fx` symbolic tracing where it works, the
execution trace where it does not (data-dependent control flow, `super().forward` in a BatchNorm
subclass, `torch.rand` on a traced size), and the two must give the same answers where both work.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnwd_cli.errors import CheckpointError, ModelFileError, UsageError
from bnwd_cli.graph.analyze import classify_model, classify_model_file
from bnwd_cli.graph.classes import (
    ClassificationMethod,
    Granularity,
    ModelClassification,
    ParamClassification,
    ParamKind,
)
from bnwd_cli.graph.model_file import load_model_file
from bnwd_cli.graph.trace import TraceMethod

MODELS = Path(__file__).parent / "models"
INV, AFF, DEAD, SENS = (
    ParamKind.SCALE_INVARIANT,
    ParamKind.NORM_AFFINE,
    ParamKind.DEAD_BIAS,
    ParamKind.SCALE_SENSITIVE,
)


def classify(
    file: str,
    factory: str | None = None,
    *,
    method: TraceMethod = TraceMethod.AUTO,
    input_shape: tuple[int, ...] | None = None,
) -> ModelClassification:
    return classify_model_file(MODELS / file, factory, input_shape, method=method)


def by_name(result: ModelClassification) -> dict[str, ParamClassification]:
    return result.by_name()


def assert_verdicts(
    result: ModelClassification, expected: dict[str, tuple[ParamKind, Granularity]]
) -> None:
    got = {
        name: (p.kind, p.granularity) for name, p in result.by_name().items() if name in expected
    }
    assert got == expected


# --------------------------------------------------------------------------- the cases


def test_conv_gelu_bn_is_not_invariant() -> None:
    result = classify("cases.py", "conv_gelu_bn")
    p = by_name(result)
    assert p["conv.weight"].kind is SENS
    assert "GELU" in p["conv.weight"].evidence and "homogeneous" in p["conv.weight"].evidence
    assert (p["bn.weight"].kind, p["bn.bias"].kind) == (AFF, AFF)
    assert p["bn.weight"].norm_layers == ("bn",)
    assert p["head.fc.weight"].kind is SENS and p["head.fc.bias"].kind is SENS


def test_conv_relu_maxpool_bn_is_invariant_per_row_with_its_path() -> None:
    result = classify("cases.py", "conv_relu_maxpool_bn")
    conv = by_name(result)["conv.weight"]
    assert (conv.kind, conv.granularity) == (INV, Granularity.PER_ROW)
    assert conv.norm_layers == ("bn",)
    assert conv.path == ("conv", "relu", "max_pool2d", "bn")
    assert result.method is ClassificationMethod.FX_SYMBOLIC


def test_residual_sum_into_bn_makes_a_joint_group() -> None:
    result = classify("cases.py", "residual_sum_bn")
    a, b = by_name(result)["conv_a.weight"], by_name(result)["conv_b.weight"]
    assert (a.kind, a.granularity, b.kind, b.granularity) == (
        INV, Granularity.JOINT, INV, Granularity.JOINT,
    )  # fmt: skip
    assert a.joint_group is not None and a.joint_group == b.joint_group
    assert result.joint_groups[a.joint_group] == ("conv_a.weight", "conv_b.weight")
    assert a.path[0] == "conv_a" and b.path[0] == "conv_b"  # each member's own path
    assert a.norm_layers == ("bn",)


def test_layernorm_gives_whole_tensor_not_per_row() -> None:
    result = classify("cases.py", "linear_layernorm", input_shape=(6, 5))
    fc1 = by_name(result)["fc1.weight"]
    assert (fc1.kind, fc1.granularity) == (INV, Granularity.WHOLE_TENSOR)
    assert fc1.norm_layers == ("norm",)
    assert by_name(result)["out.weight"].kind is SENS


def test_conv_bias_is_dead_before_bn_and_joint_before_layernorm_and_groupnorm() -> None:
    result = classify("cases.py", "conv_bias_norms")
    p = by_name(result)
    assert (p["conv_bn.weight"].kind, p["conv_bn.weight"].granularity) == (INV, Granularity.PER_ROW)
    assert p["conv_bn.bias"].kind is DEAD and p["conv_bn.bias"].norm_layers == ("bn",)
    for conv, norm in (("conv_ln", "ln"), ("conv_gn", "gn")):
        w, b = p[f"{conv}.weight"], p[f"{conv}.bias"]
        assert (w.kind, w.granularity, b.kind, b.granularity) == (
            INV, Granularity.JOINT, INV, Granularity.JOINT,
        ), conv  # fmt: skip
        assert w.joint_group == b.joint_group is not None
        assert result.joint_groups[w.joint_group] == (f"{conv}.weight", f"{conv}.bias")
        assert w.norm_layers == (norm,)
    assert p["conv_ln.weight"].joint_group != p["conv_gn.weight"].joint_group


def test_groupnorm_is_per_group() -> None:
    conv = by_name(classify("cases.py", "groupnorm_per_group"))["conv.weight"]
    assert (conv.kind, conv.granularity, conv.groups) == (INV, Granularity.PER_GROUP, 4)


def test_fan_out_to_an_unnormalized_consumer_breaks_invariance() -> None:
    conv = by_name(classify("cases.py", "fan_out"))["conv.weight"]
    assert conv.kind is SENS
    assert "side.fc" in conv.path  # the path it escapes through


def test_concatenation_into_bn_keeps_each_branch_invariant_on_its_own() -> None:
    result = classify("cases.py", "concat_bn")
    assert_verdicts(
        result,
        {
            "conv_a.weight": (INV, Granularity.PER_ROW),
            "conv_b.weight": (INV, Granularity.PER_ROW),
        },
    )
    assert result.joint_groups == ()


def test_bias_before_relu_then_bn_is_neither_dead_nor_separable() -> None:
    result = classify("cases.py", "relu_bias_bn")
    w, b = by_name(result)["conv.weight"], by_name(result)["conv.bias"]
    assert (w.granularity, b.granularity) == (Granularity.JOINT, Granularity.JOINT)
    assert w.joint_group == b.joint_group


def test_weight_standardized_conv_is_invariant_without_any_norm_layer() -> None:
    result = classify("weight_standardized.py")
    assert_verdicts(
        result,
        {
            "conv1.weight": (INV, Granularity.PER_ROW),  # each filter standardized
            "conv2.weight": (INV, Granularity.WHOLE_TENSOR),  # whole tensor standardized
            "conv3.weight": (INV, Granularity.PER_ROW),  # F.batch_norm on the weight
            "fc.weight": (SENS, Granularity.NONE),
            "fc.bias": (SENS, Granularity.NONE),
        },
    )
    for name in ("conv1.weight", "conv2.weight", "conv3.weight"):
        assert "weight standardization" in by_name(result)[name].evidence


def test_head_is_scale_sensitive() -> None:
    head = by_name(classify("resnet_like.py"))["fc.weight"]
    assert head.kind is SENS
    assert "output" in head.evidence


def test_data_dependent_control_flow_uses_the_execution_trace() -> None:
    result = classify("data_dependent.py")
    assert result.method is ClassificationMethod.EXECUTION_TRACE
    assert any("symbolic tracing failed" in n for n in result.notes)
    p = by_name(result)
    assert (p["conv1.weight"].kind, p["conv1.weight"].granularity) == (INV, Granularity.PER_ROW)
    assert (p["conv_pos.weight"].kind, p["conv_pos.weight"].granularity) == (
        INV,
        Granularity.PER_ROW,
    )
    assert p["conv_pos.weight"].norm_layers == ("bn2",)
    # the branch that did not run: no claim either way
    assert p["conv_neg.weight"].kind is SENS
    assert "not used" in p["conv_neg.weight"].evidence
    assert all(q.method is ClassificationMethod.EXECUTION_TRACE for q in result.params)


def test_fx_only_refuses_data_dependent_control_flow_with_a_hint() -> None:
    with pytest.raises(ModelFileError, match="--trace execution"):
        classify("data_dependent.py", method=TraceMethod.FX)


@pytest.mark.parametrize("factory", ["build_model", "build_super_model"])
def test_norm_subclasses(factory: str) -> None:
    result = classify("norm_subclasses.py", factory)
    expected_method = (
        ClassificationMethod.FX_SYMBOLIC
        if factory == "build_model"
        else ClassificationMethod.EXECUTION_TRACE  # BatchNorm's input check defeats fx
    )
    assert result.method is expected_method
    p = by_name(result)
    assert (p["conv1.weight"].granularity, p["conv1.weight"].norm_layers) == (
        Granularity.PER_ROW,
        ("bn1",),
    )
    assert (p["conv2.weight"].granularity, p["conv2.weight"].norm_layers) == (
        Granularity.WHOLE_TENSOR,
        ("ln2",),
    )
    assert {p[n].kind for n in ("bn1.weight", "bn1.bias", "ln2.weight", "ln2.bias")} == {AFF}


def test_functional_norms() -> None:
    result = classify("norm_subclasses.py", "build_functional")
    p = by_name(result)
    assert (p["conv_bn.weight"].granularity, p["conv_bn.weight"].norm_layers) == (
        Granularity.PER_ROW, ("batch_norm",),
    )  # fmt: skip
    assert (p["conv_gn.weight"].granularity, p["conv_gn.weight"].groups) == (
        Granularity.PER_GROUP, 3,
    )  # fmt: skip
    assert p["conv_ln.weight"].granularity is Granularity.WHOLE_TENSOR
    assert (p["proj.weight"].granularity, p["proj.weight"].norm_layers) == (
        Granularity.WHOLE_TENSOR, ("rms_norm",),
    )  # fmt: skip
    affines = ("bn_weight", "bn_bias", "gn_weight", "gn_bias", "ln_weight", "ln_bias", "rms_weight")
    assert {p[n].kind for n in affines} == {AFF}


# --------------------------------------------------------------------------- architectures


def test_resnet_like() -> None:
    result = classify("resnet_like.py")
    assert result.method is ClassificationMethod.FX_SYMBOLIC
    model = load_model_file(MODELS / "resnet_like.py").model
    modules = dict(model.named_modules())
    for p in result.params:
        module = modules[p.name.rsplit(".", 1)[0]]
        if isinstance(module, nn.Conv2d):
            assert (p.kind, p.granularity) == (INV, Granularity.PER_ROW), p.name
            # the BN that follows: bnK after convK, downsample.1 after downsample.0
            expected = p.name.replace("conv", "bn").replace("downsample.0", "downsample.1")
            assert p.norm_layers == (expected.rsplit(".", 1)[0],), p.name
        elif isinstance(module, nn.BatchNorm2d):
            assert p.kind is AFF, p.name
        else:
            assert p.kind is SENS, p.name


def test_convnext_like() -> None:
    result = classify("convnext_like.py")
    p = by_name(result)
    groups = result.joint_groups

    def group_of(name: str) -> set[str]:
        gid = p[name].joint_group
        assert gid is not None, name
        return set(groups[gid])

    assert group_of("stem.0.weight") == {"stem.0.weight", "stem.0.bias"}
    for stage in ("stage1", "stage2"):
        for block in ("0", "1"):
            prefix = f"{stage}.{block}"
            assert group_of(f"{prefix}.dwconv.weight") == {
                f"{prefix}.dwconv.weight", f"{prefix}.dwconv.bias",
            }  # fmt: skip
            assert p[f"{prefix}.pwconv1.weight"].kind is SENS
            assert p[f"{prefix}.norm.weight"].kind is AFF
    for block in ("0", "1"):  # stage 1: the stream starts at the stem's LayerNorm output
        for name in ("pwconv2.weight", "pwconv2.bias", "gamma"):
            assert p[f"stage1.{block}.{name}"].kind is SENS
    stream = {
        "downsample.1.weight", "downsample.1.bias", "stage2.0.gamma", "stage2.1.gamma",
        "stage2.0.dwconv.bias", "stage2.1.dwconv.bias",
    }  # fmt: skip
    assert group_of("downsample.1.weight") == stream
    assert group_of("stage2.0.gamma") == stream
    assert p["downsample.0.weight"].kind is AFF
    assert p["head.weight"].kind is SENS


def test_efficientnet_like() -> None:
    result = classify("efficientnet_like.py")
    p = by_name(result)
    for name, q in p.items():
        if name.endswith(("conv_stem.weight", "conv_pw.weight", "conv_dw.weight",
                          "conv_pwl.weight", "conv_head.weight")):  # fmt: skip
            assert (q.kind, q.granularity) == (INV, Granularity.PER_ROW), name
        elif ".se." in name or name.startswith("classifier"):
            assert q.kind is SENS, name
        else:
            assert q.kind is AFF, name


@pytest.mark.parametrize(
    ("file", "factory", "shape"),
    [
        ("cases.py", "conv_bias_norms", None),
        ("cases.py", "residual_sum_bn", None),
        ("cases.py", "groupnorm_per_group", None),
        ("resnet_like.py", None, None),
        ("convnext_like.py", None, None),
        ("weight_standardized.py", None, None),
        ("norm_subclasses.py", "build_functional", None),
    ],
)
def test_fx_and_execution_traces_agree(file: str, factory: str | None, shape: object) -> None:
    fx = classify(file, factory, method=TraceMethod.FX)
    ex = classify(file, factory, method=TraceMethod.EXECUTION)
    assert fx.method is ClassificationMethod.FX_SYMBOLIC
    assert ex.method is ClassificationMethod.EXECUTION_TRACE

    def key(c: ModelClassification) -> list[tuple[object, ...]]:
        return [(p.name, p.kind, p.granularity, p.groups, p.joint_group, p.norm_layers)
                for p in c.params]  # fmt: skip

    assert key(fx) == key(ex)
    assert fx.joint_groups == ex.joint_groups


# --------------------------------------------------------------------------- more operators


class _Wrapped(nn.Module):
    def __init__(self, body: nn.Module, channels: int) -> None:
        super().__init__()
        self.body = body
        self.fc = nn.Linear(channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean(dim=(2, 3)))


def _single(body: nn.Module, name: str, channels: int = 4) -> ParamClassification:
    x = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    return classify_model(_Wrapped(body, channels), x).by_name()[f"body.{name}"]


def test_instance_norm_is_per_row() -> None:
    body = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.InstanceNorm2d(4, affine=True))
    conv = _single(body, "0.weight")
    assert (conv.kind, conv.granularity) == (INV, Granularity.PER_ROW)


def test_instance_norm_removes_a_bias_like_batch_norm() -> None:
    body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4))
    assert _single(body, "0.bias").kind is DEAD


def test_rmsnorm_module_keeps_a_bias_in_the_group() -> None:
    class ChannelsLastRMS(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.norm = nn.RMSNorm(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    w = _single(ChannelsLastRMS(), "conv.weight")
    # RMSNorm subtracts no mean: the bias must be rescaled along (joint), it is not dead either
    assert (w.kind, w.granularity) == (INV, Granularity.JOINT)
    assert _single(ChannelsLastRMS(), "conv.bias").granularity is Granularity.JOINT


def test_weight_norm_parametrization() -> None:
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3))
    body = nn.Sequential(conv, nn.GELU())
    v = _single(body, "0.parametrizations.weight.original1")
    g = _single(body, "0.parametrizations.weight.original0")
    assert (v.kind, v.granularity) == (INV, Granularity.PER_ROW)  # direction of each filter
    assert g.kind is AFF  # the gain that weight norm learns instead


def test_squeeze_excite_gate_on_the_normalized_input_breaks_invariance() -> None:
    class GatedBeforeNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, bias=False)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y * torch.sigmoid(y.mean(dim=(2, 3), keepdim=True)))

    assert _single(GatedBeforeNorm(), "conv.weight").kind is SENS


def test_leaky_relu_avgpool_dropout_and_padding_keep_per_row_invariance() -> None:
    body = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),
        nn.LeakyReLU(0.1),
        nn.ZeroPad2d(1),
        nn.AvgPool2d(2),
        nn.Dropout(0.3),
        nn.BatchNorm2d(4),
    )
    conv = _single(body, "0.weight")
    assert (conv.kind, conv.granularity) == (INV, Granularity.PER_ROW)
    assert conv.path == ("body.0", "body.1", "body.2", "body.3", "body.4", "body.5")


def test_flatten_linear_batchnorm1d() -> None:
    body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 5, bias=False), nn.BatchNorm1d(5))

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = body
            self.fc = nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.relu(self.body(x)))

    x = torch.randn(3, 3, 6, 6)
    lin = classify_model(Head(), x).by_name()["body.1.weight"]
    assert (lin.kind, lin.granularity) == (INV, Granularity.PER_ROW)


def test_unmodelled_operation_is_conservative_and_noted() -> None:
    class EinsumConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3))
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(torch.einsum("oc,nchw->nohw", self.weight, x))

    result = classify_model(_Wrapped(EinsumConv(), 4), torch.randn(3, 3, 6, 6))
    assert result.by_name()["body.weight"].kind is SENS
    assert any("einsum" in note for note in result.notes)


# --------------------------------------------------------------------------- contract


def test_classification_covers_every_parameter_in_order() -> None:
    model = load_model_file(MODELS / "convnext_like.py").model
    result = classify("convnext_like.py")
    assert [p.name for p in result.params] == [n for n, _ in model.named_parameters()]
    assert [p.shape for p in result.params] == [tuple(t.shape) for _, t in model.named_parameters()]


def test_analysis_leaves_the_model_as_it_found_it() -> None:
    loaded = load_model_file(MODELS / "resnet_like.py")
    model = loaded.model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classify_model(model, loaded.example_input)
    assert not model.training and not any(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats untouched


def test_example_input_forms() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4, bias=False)
            self.norm = nn.LayerNorm(4)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.norm(self.a(x)) * scale

    x, s = torch.randn(2, 3), torch.randn(2, 4)
    for example in ((x, s), {"x": x, "scale": s}):
        a = classify_model(TwoInputs(), example).by_name()["a.weight"]
        assert (a.kind, a.granularity) == (INV, Granularity.WHOLE_TENSOR)
    with pytest.raises(UsageError):
        classify_model(TwoInputs(), 3)


def test_broken_forward_is_a_model_file_error_with_the_users_line() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.view(-1, 5))  # the user's bug

    with pytest.raises(ModelFileError) as info:
        classify_model(Broken(), torch.randn(2, 3))
    message = str(info.value)
    assert "forward pass on the example input ((2, 3))" in message
    assert "x.view(-1, 5)" in message and "test_graph_analysis.py" in message
    assert "site-packages" not in message


def test_checkpoint_weights_are_loaded_before_the_analysis(tmp_path: Path) -> None:
    model = load_model_file(MODELS / "data_dependent.py").model
    state = model.state_dict()
    state["conv1.weight"] = state["conv1.weight"] * 3.0
    torch.save(state, tmp_path / "trained.pt")
    loaded = load_model_file(MODELS / "data_dependent.py", checkpoint=tmp_path / "trained.pt")
    assert torch.equal(loaded.model.state_dict()["conv1.weight"], state["conv1.weight"])
    result = classify_model_file(MODELS / "data_dependent.py", checkpoint=tmp_path / "trained.pt")
    assert by_name(result)["conv1.weight"].granularity is Granularity.PER_ROW


def test_checkpoint_that_does_not_match_the_model(tmp_path: Path) -> None:
    torch.save({"conv1.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="missing parameters"):
        load_model_file(MODELS / "data_dependent.py", checkpoint=tmp_path / "other.pt")


def test_pre_norm_transformer_residual_stream_is_one_joint_group() -> None:
    result = classify("transformer_like.py")
    p = by_name(result)
    stream = {"patch.weight", "patch.bias", "cls", "pos"} | {
        f"blocks.{b}.{layer}.{t}"
        for b in (0, 1)
        for layer in ("attn.proj", "fc2")
        for t in ("weight", "bias")
    }
    gid = p["patch.weight"].joint_group
    assert gid is not None and set(result.joint_groups[gid]) == stream
    assert all(p[name].joint_group == gid for name in stream)
    for b in (0, 1):
        for name in ("attn.qkv.weight", "attn.qkv.bias", "fc1.weight", "fc1.bias"):
            assert p[f"blocks.{b}.{name}"].kind is SENS
    assert p["head.weight"].kind is SENS


def test_preactivation_residual_stream() -> None:
    p = by_name(classify("transformer_like.py", "build_preact"))
    assert (p["stem.weight"].granularity, p["conv2.weight"].granularity) == (
        Granularity.JOINT,
        Granularity.JOINT,
    )
    assert p["stem.weight"].joint_group == p["conv2.weight"].joint_group
    assert set(p["stem.weight"].norm_layers) == {"bn1", "bn_final"}
    assert (p["conv1.weight"].granularity, p["conv1.weight"].norm_layers) == (
        Granularity.PER_ROW,
        ("bn2",),
    )
