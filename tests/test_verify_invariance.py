"""Numeric verification (`bnwd_cli.graph.verify`): it confirms the right verdicts on every
hand-built model, catches deliberately wrong ones (wrong class, wrong granularity, a joint group
split up, a live bias called dead, an invariant weight called sensitive), reports a dead branch
as no evidence rather than invariance, tells "invariant up to eps" from "not invariant", and
resets the RNG so dropout cannot fake or hide anything.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from bnwd_cli.errors import UsageError
from bnwd_cli.graph.analyze import classify_model
from bnwd_cli.graph.classes import Granularity, ModelClassification, ParamKind
from bnwd_cli.graph.heuristic import TensorEntry, classify_state_dict
from bnwd_cli.graph.model_file import LoadedModel, load_model_file
from bnwd_cli.graph.verify import (
    FLOAT64,
    Agreement,
    InvarianceReport,
    NumericVerdict,
    verify_classification,
    verify_model,
    verify_model_file,
)

MODELS = Path(__file__).parent / "models"
V = NumericVerdict


def load(file: str, factory: str | None = None, **kwargs: object) -> LoadedModel:
    return load_model_file(MODELS / file, factory=factory, **kwargs)  # type: ignore[arg-type]


def numeric(report: InvarianceReport) -> dict[str, NumericVerdict]:
    return {v.classification.name: v.numeric.verdict for v in report.params}


def agreement(report: InvarianceReport) -> dict[str, Agreement]:
    return {v.classification.name: v.agreement for v in report.params}


def with_claim(c: ModelClassification, name: str, **changes: object) -> ModelClassification:
    """`c` with one parameter's verdict replaced (a deliberately wrong structural claim)."""
    params = tuple(replace(p, **changes) if p.name == name else p for p in c.params)  # type: ignore[arg-type]
    return replace(c, params=params)


@pytest.mark.parametrize(
    ("file", "factory"),
    [
        ("cases.py", "conv_relu_maxpool_bn"),
        ("cases.py", "conv_gelu_bn"),
        ("cases.py", "residual_sum_bn"),
        ("cases.py", "conv_bias_norms"),
        ("cases.py", "groupnorm_per_group"),
        ("cases.py", "fan_out"),
        ("cases.py", "concat_bn"),
        ("cases.py", "relu_bias_bn"),
        ("resnet_like.py", None),
        ("convnext_like.py", None),
        ("efficientnet_like.py", None),
        ("weight_standardized.py", None),
        ("data_dependent.py", None),
        ("norm_subclasses.py", "build_model"),
        ("norm_subclasses.py", "build_functional"),
        ("transformer_like.py", None),
        ("transformer_like.py", "build_preact"),
    ],
)
def test_numbers_confirm_the_graph_on_every_model(file: str, factory: str | None) -> None:
    report = verify_model_file(MODELS / file, factory=factory, device="cpu")
    assert report.agrees, report.disagreements
    for v in report.params:
        kind = v.classification.kind
        if kind is ParamKind.SCALE_INVARIANT:
            assert v.numeric.verdict in (V.INVARIANT, V.EPS_LIMITED), v.classification.name
            assert v.numeric.output_error is not None and v.numeric.output_error <= 1e-9
            assert v.numeric.euler_cos is not None and abs(v.numeric.euler_cos) <= 1e-8
        elif kind is ParamKind.SCALE_SENSITIVE and v.agreement is not Agreement.NO_EVIDENCE:
            assert v.numeric.verdict is V.NOT_INVARIANT, v.classification.name
        elif kind is ParamKind.DEAD_BIAS:
            assert v.numeric.verdict is V.DEAD
    assert report.tolerances == FLOAT64 and report.device == "cpu"


def test_per_row_units_use_independent_row_factors_and_check_gradient_scaling() -> None:
    report = verify_model_file(MODELS / "resnet_like.py", device="cpu")
    conv = next(v for v in report.params if v.classification.name == "layer1.0.conv1.weight")
    n = conv.numeric
    assert n.verdict is V.INVARIANT
    assert n.row_euler_max is not None and n.row_euler_max <= 1e-8
    assert n.grad_scaling_error is not None and n.grad_scaling_error <= 1e-8
    # all ten conv units passed in one batched forward pass: 4 forward, 3 backward in total
    assert n.output_batch == 10
    assert (report.forward_passes, report.backward_passes) == (4, 3)


def test_layernorm_whole_tensor_holds_but_a_per_row_claim_fails() -> None:
    loaded = load("cases.py", "linear_layernorm", input_shape=(6, 5))
    c = classify_model(loaded.model, loaded.example_input)
    right = verify_classification(loaded.model, loaded.example_input, c)
    assert numeric(right)["fc1.weight"] is V.INVARIANT
    wrong = with_claim(c, "fc1.weight", granularity=Granularity.PER_ROW)
    report = verify_classification(loaded.model, loaded.example_input, wrong)
    assert numeric(report)["fc1.weight"] is V.NOT_INVARIANT
    assert agreement(report)["fc1.weight"] is Agreement.DISAGREE
    assert report.disagreements == ("fc1.weight",)


def test_numbers_catch_a_wrong_invariance_claim() -> None:
    loaded = load("cases.py", "conv_gelu_bn")
    c = classify_model(loaded.model, loaded.example_input)
    wrong = with_claim(
        c, "conv.weight", kind=ParamKind.SCALE_INVARIANT, granularity=Granularity.PER_ROW
    )
    report = verify_classification(loaded.model, loaded.example_input, wrong)
    conv = next(v for v in report.params if v.classification.name == "conv.weight")
    assert conv.numeric.verdict is V.NOT_INVARIANT
    assert conv.numeric.output_error is not None and conv.numeric.output_error > 1e-6
    assert conv.agreement is Agreement.DISAGREE and not report.agrees


def test_numbers_catch_an_invariant_weight_called_sensitive() -> None:
    loaded = load("cases.py", "conv_relu_maxpool_bn")
    c = classify_model(loaded.model, loaded.example_input)
    wrong = with_claim(
        c, "conv.weight", kind=ParamKind.SCALE_SENSITIVE, granularity=Granularity.NONE
    )
    report = verify_classification(loaded.model, loaded.example_input, wrong)
    conv = next(v for v in report.params if v.classification.name == "conv.weight")
    assert conv.numeric.verdict is V.INVARIANT  # its gradient is orthogonal and the output holds
    assert conv.agreement is Agreement.DISAGREE


def test_numbers_catch_a_joint_group_split_into_two_claims() -> None:
    loaded = load("cases.py", "residual_sum_bn")
    c = classify_model(loaded.model, loaded.example_input)
    split = replace(
        c,
        params=tuple(
            replace(p, granularity=Granularity.WHOLE_TENSOR, joint_group=None)
            if p.name.startswith("conv_")
            else p
            for p in c.params
        ),
        joint_groups=(),
    )
    report = verify_classification(loaded.model, loaded.example_input, split)
    assert numeric(report)["conv_a.weight"] is V.NOT_INVARIANT
    assert numeric(report)["conv_b.weight"] is V.NOT_INVARIANT


def test_numbers_catch_a_live_bias_called_dead() -> None:
    loaded = load("cases.py", "conv_bias_norms")
    c = classify_model(loaded.model, loaded.example_input)
    wrong = with_claim(c, "conv_ln.bias", kind=ParamKind.DEAD_BIAS, granularity=Granularity.NONE)
    report = verify_classification(loaded.model, loaded.example_input, wrong)
    assert numeric(report)["conv_ln.bias"] is V.HAS_EFFECT
    assert agreement(report)["conv_ln.bias"] is Agreement.DISAGREE
    assert numeric(report)["conv_bn.bias"] is V.DEAD  # the real dead bias still confirmed


def test_bisection_isolates_one_wrong_claim_among_many_in_few_passes() -> None:
    loaded = load("resnet_like.py")
    c = classify_model(loaded.model, loaded.example_input)
    wrong = with_claim(
        c, "fc.weight", kind=ParamKind.SCALE_INVARIANT, granularity=Granularity.PER_ROW
    )
    report = verify_classification(loaded.model, loaded.example_input, wrong)
    verdicts = numeric(report)
    assert verdicts["fc.weight"] is V.NOT_INVARIANT
    assert all(
        verdicts[p.name] is V.INVARIANT for p in c.params if p.kind is ParamKind.SCALE_INVARIANT
    )
    units = sum(1 for p in wrong.params if p.kind is ParamKind.SCALE_INVARIANT)  # 11
    # base, all-at-once, bisection (2 per level), one regrad, model eps base + batched
    assert report.forward_passes <= 2 + 2 * math.ceil(math.log2(units)) + 1 + 2
    assert report.backward_passes == 4


def test_dead_branch_is_no_evidence_not_invariance() -> None:
    report = verify_model_file(MODELS / "cases.py", factory="zero_gamma_branch", device="cpu")
    verdicts, agreements = numeric(report), agreement(report)
    for name in ("conv_a1.weight", "conv_a2.weight", "conv_g2.weight"):  # claimed invariant
        assert verdicts[name] is V.NO_EVIDENCE and agreements[name] is Agreement.NO_EVIDENCE
    # structurally NOT invariant, yet rescaling it changes nothing here: no evidence either way
    assert verdicts["conv_g1.weight"] is V.NO_EVIDENCE
    assert agreements["conv_g1.weight"] is Agreement.NO_EVIDENCE
    assert verdicts["stem.weight"] is V.INVARIANT  # the live part is still tested
    assert report.agrees


def test_eps_limited_is_told_apart_from_not_invariant() -> None:
    report = verify_model_file(MODELS / "cases.py", factory="eps_limited", device="cpu")
    conv = next(v for v in report.params if v.classification.name == "conv.weight")
    n = conv.numeric
    assert n.verdict is V.EPS_LIMITED and conv.agreement is Agreement.AGREE
    assert n.output_error is not None and n.output_error <= 1e-9  # eps shrunk: invariant
    assert n.row_euler_max_model_eps is not None and n.row_euler_max_model_eps > 0.1  # the tiny row
    # the same model without the tiny row is plainly invariant
    loaded = load("cases.py", "eps_limited")
    with torch.no_grad():
        loaded.model.conv.weight[2].mul_(1e4)  # type: ignore[union-attr, operator]
    plain = verify_model(loaded.model, loaded.example_input)
    assert numeric(plain)["conv.weight"] is V.INVARIANT


class _DropoutBeforeBN(nn.Module):
    """conv -> dropout -> BN: invariant only if both passes drop the same units."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.drop(self.conv(x))).relu().mean(dim=(2, 3)))


def test_rng_is_reset_before_every_forward_pass() -> None:
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    report = verify_model(_DropoutBeforeBN(), x)
    assert numeric(report)["conv.weight"] is V.INVARIANT
    model = _DropoutBeforeBN()
    state = torch.random.get_rng_state()
    verify_model(model, x)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is left alone


def test_verification_leaves_the_model_untouched() -> None:
    loaded = load("convnext_like.py")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    verify_model(loaded.model, loaded.example_input)
    after = loaded.model.state_dict()
    assert all(after[k].dtype == torch.float32 for k in after if after[k].is_floating_point())
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.get_default_dtype() == torch.float32


def test_checkpoint_weights_are_what_gets_verified(tmp_path: Path) -> None:
    loaded = load("cases.py", "conv_relu_maxpool_bn")
    state = loaded.model.state_dict()
    state["bn.weight"] = torch.zeros_like(state["bn.weight"])  # "trained" to a dead channel set
    torch.save(state, tmp_path / "trained.pt")
    report = verify_model_file(
        MODELS / "cases.py", factory="conv_relu_maxpool_bn", checkpoint=tmp_path / "trained.pt"
    )
    assert numeric(report)["conv.weight"] is V.NO_EVIDENCE
    assert "trained.pt" in report.model


def test_a_heuristic_classification_can_be_verified_too() -> None:
    loaded = load("resnet_like.py")
    entries = [TensorEntry(k, tuple(v.shape)) for k, v in loaded.model.state_dict().items()]
    heuristic = classify_state_dict(entries)
    report = verify_classification(loaded.model, loaded.example_input, heuristic)
    assert report.agrees
    assert numeric(report)["layer2.0.conv2.weight"] is V.INVARIANT


def test_cuda_without_a_gpu_is_a_usage_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    loaded = load("cases.py", "conv_relu_maxpool_bn")
    with pytest.raises(UsageError, match="--device cuda"):
        verify_model(loaded.model, loaded.example_input, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_float32_with_looser_tolerances() -> None:
    report = verify_model_file(MODELS / "resnet_like.py", device="cuda")
    assert report.tolerances.dtype == "float32" and report.tolerances.output == 1e-4
    assert "TF32 off" in report.device
    assert report.agrees


def test_classification_for_another_model_is_refused() -> None:
    loaded = load("cases.py", "conv_relu_maxpool_bn")
    other = classify_model(*_other())
    with pytest.raises(UsageError, match="lacks"):
        verify_classification(loaded.model, loaded.example_input, other)


def _other() -> tuple[nn.Module, torch.Tensor]:
    return nn.Sequential(nn.Linear(3, 2)), torch.randn(2, 3)


def test_param_records_follow_the_classification() -> None:
    loaded = load("cases.py", "conv_bias_norms")
    c = classify_model(loaded.model, loaded.example_input)
    report = verify_classification(loaded.model, loaded.example_input, c)
    assert [v.classification for v in report.params] == list(c.params)
    groups = {g.members: g.verdict for g in report.joint_groups}
    assert groups == {
        ("conv_ln.weight", "conv_ln.bias"): V.INVARIANT,
        ("conv_gn.weight", "conv_gn.bias"): V.INVARIANT,
    }
    # the weight alone is NOT invariant before LayerNorm (its bias is not removed)
    alone = with_claim(c, "conv_ln.weight", granularity=Granularity.WHOLE_TENSOR, joint_group=None)
    alone = replace(alone, joint_groups=(("conv_gn.weight", "conv_gn.bias"),))
    alone = replace(
        alone,
        params=tuple(
            replace(
                p, kind=ParamKind.SCALE_SENSITIVE, granularity=Granularity.NONE, joint_group=None
            )
            if p.name == "conv_ln.bias"
            else replace(p, joint_group=0)
            if p.name.startswith("conv_gn.")
            else p
            for p in alone.params
        ),
    )
    report = verify_classification(loaded.model, loaded.example_input, alone)
    assert numeric(report)["conv_ln.weight"] is V.NOT_INVARIANT
