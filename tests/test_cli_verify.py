"""`bnwd verify-invariance` through `typer.testing.CliRunner`: exit codes (0 agree, 1 disagree,
2 bad input), stdout (data only) and stderr (timings, warnings, errors) checked separately,
every output format parsed back, every kind of broken model file, and a golden table.

The installed Typer keeps stderr apart from stdout in `Result`, so no switch is needed.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner, Result

from bnwd_cli.cli.app import app
from bnwd_cli.graph.classes import (
    ClassificationMethod,
    Granularity,
    ModelClassification,
    ParamClassification,
    ParamKind,
)
from bnwd_cli.graph.verify import (
    FLOAT64,
    Agreement,
    InvarianceReport,
    JointGroupCheck,
    NumericResult,
    NumericVerdict,
    ParamVerification,
)
from bnwd_cli.render.invariance import CSV_COLUMNS, render_table
from bnwd_cli.render.output import SCHEMA_VERSION

runner = CliRunner()
MODELS = Path(__file__).parent / "models"
EXIT_OK, EXIT_DISAGREE, EXIT_BAD_INPUT = 0, 1, 2
GOLDEN = Path(__file__).parent / "golden" / "verify_invariance_table.txt"


def invoke(*args: str) -> Result:
    return runner.invoke(app, ["verify-invariance", *args])


def model(name: str) -> str:
    return str(MODELS / name)


def assert_clean_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == EXIT_BAD_INPUT, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


# --------------------------------------------------------------------------- success


def test_agreeing_model_exits_0_with_the_table_on_stdout() -> None:
    result = invoke(model("cases.py"), "--factory", "conv_relu_maxpool_bn", "--device", "cpu")
    assert result.exit_code == EXIT_OK, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith(" conv.weight "))
    assert re.search(r"scale-invariant\s+per-row\s+bn\s+invariant\s+output", row)
    assert row.rstrip().endswith("agree")
    assert "RESULT: graph and numbers agree" in result.stdout
    assert "graph: torch.fx symbolic trace; numbers: float64 on cpu" in result.stdout
    assert "graph analysis" in result.stderr and "numeric check" in result.stderr
    assert "graph analysis" not in result.stdout
    assert "\x1b[" not in result.stdout


def test_json_document() -> None:
    result = invoke(model("cases.py:conv_bias_norms"), "--format", "json")
    assert result.exit_code == EXIT_OK, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == SCHEMA_VERSION
    assert doc["agree"] is True and doc["disagreements"] == []
    assert doc["tracing_method"] == ClassificationMethod.FX_SYMBOLIC.value
    assert doc["dtype"] == "float64" and doc["tolerances"]["output"] == FLOAT64.output
    records = {r["name"]: r for r in doc["parameters"]}
    assert list(records) == [
        "conv_bn.weight", "conv_bn.bias", "bn.weight", "bn.bias", "conv_ln.weight",
        "conv_ln.bias", "ln.weight", "ln.bias", "conv_gn.weight", "conv_gn.bias", "gn.weight",
        "gn.bias", "head.fc.weight", "head.fc.bias",
    ]  # fmt: skip
    w = records["conv_bn.weight"]
    assert (w["structural_class"], w["granularity"], w["norm_layers"], w["shape"]) == (
        "scale-invariant", "per-row", ["bn"], [6, 3, 3, 3],
    )  # fmt: skip
    assert w["tracing_method"] == doc["tracing_method"]
    assert w["numeric"]["verdict"] == "invariant" and w["numeric"]["output_error"] <= 1e-9
    assert records["conv_bn.bias"]["structural_class"] == "dead-bias"
    assert records["conv_bn.bias"]["numeric"]["verdict"] == "dead"
    ln_w, ln_b = records["conv_ln.weight"], records["conv_ln.bias"]
    assert ln_w["granularity"] == ln_b["granularity"] == "joint"
    assert ln_w["joint_group"] == ln_b["joint_group"]
    group = doc["joint_groups"][ln_w["joint_group"]]
    assert group["members"] == ["conv_ln.weight", "conv_ln.bias"]
    assert group["verdict"] == "invariant"
    assert records["head.fc.weight"]["numeric"]["verdict"] == "not invariant"


def test_factory_option_and_colon_syntax_give_the_same_document() -> None:
    a = invoke(model("cases.py"), "--factory", "residual_sum_bn", "-f", "json")
    b = invoke(model("cases.py:residual_sum_bn"), "-f", "json")
    assert a.exit_code == b.exit_code == EXIT_OK
    assert json.loads(a.stdout)["parameters"] == json.loads(b.stdout)["parameters"]


def test_csv_is_tidy_one_row_per_parameter() -> None:
    result = invoke(model("resnet_like.py"), "--format", "csv")
    assert result.exit_code == EXIT_OK
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert tuple(rows[0]) == tuple(CSV_COLUMNS)
    body = [dict(zip(rows[0], r, strict=True)) for r in rows[1:]]
    assert len(body) == 32  # parameters of the ResNet-like model
    convs = [r for r in body if r["name"].endswith("conv1.weight")]
    assert convs and all(r["numeric_verdict"] == "invariant" for r in convs)
    assert all(float(r["output_error"]) <= 1e-9 for r in convs)


def test_markdown() -> None:
    result = invoke(model("cases.py:groupnorm_per_group"), "--format", "markdown")
    assert result.exit_code == EXIT_OK
    assert result.stdout.startswith("### ✅ bnwd verify-invariance")
    assert "| `conv.weight` | 8×3×3×3 | scale-invariant | per-group (4) | gn | invariant |" in (
        result.stdout
    )


def test_output_file(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    result = invoke(model("cases.py:concat_bn"), "-f", "json", "-o", str(target))
    assert result.exit_code == EXIT_OK
    assert result.stdout == ""
    assert json.loads(target.read_text())["agree"] is True


def test_execution_trace_is_reported() -> None:
    result = invoke(model("data_dependent.py"), "-f", "json")
    assert result.exit_code == EXIT_OK
    doc = json.loads(result.stdout)
    assert doc["tracing_method"] == ClassificationMethod.EXECUTION_TRACE.value
    assert any("symbolic tracing failed" in note for note in doc["notes"])
    records = {r["name"]: r for r in doc["parameters"]}
    assert records["conv_neg.weight"]["agreement"] == "no evidence"
    assert "no numeric evidence for 1 parameter" in result.stderr


def test_checkpoint_is_loaded(tmp_path: Path) -> None:
    from bnwd_cli.graph.model_file import load_model_file

    state = load_model_file(MODELS / "cases.py", factory="conv_relu_maxpool_bn").model.state_dict()
    state["bn.weight"] = torch.zeros_like(state["bn.weight"])
    torch.save(state, tmp_path / "trained.pt")
    result = invoke(
        model("cases.py:conv_relu_maxpool_bn"), "--checkpoint", str(tmp_path / "trained.pt"),
        "-f", "json",
    )  # fmt: skip
    assert result.exit_code == EXIT_OK, result.stderr
    records = {r["name"]: r for r in json.loads(result.stdout)["parameters"]}
    assert records["conv.weight"]["numeric"]["verdict"] == "no evidence"  # its BN is dead now
    assert "no numeric evidence" in result.stderr


def test_checkpoint_that_does_not_fit(tmp_path: Path) -> None:
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    result = invoke(
        model("cases.py:conv_relu_maxpool_bn"), "--checkpoint", str(tmp_path / "other.pt")
    )
    assert_clean_error(result, "other.pt", "does not match the model")


# --------------------------------------------------------------------------- disagreement


def test_disagreement_exits_1() -> None:
    result = invoke(model("unmodelled_einsum.py"))
    assert result.exit_code == EXIT_DISAGREE
    assert "RESULT: graph and numbers DISAGREE on weight" in result.stdout
    assert "disagree:" in result.stderr and "weight" in result.stderr
    doc = json.loads(invoke(model("unmodelled_einsum.py"), "-f", "json").stdout)
    assert doc["agree"] is False and doc["disagreements"] == ["weight"]
    weight = doc["parameters"][0]
    assert (weight["structural_class"], weight["numeric"]["verdict"]) == (
        "scale-sensitive", "invariant",
    )  # fmt: skip
    assert any("einsum" in note for note in doc["notes"])


# --------------------------------------------------------------------------- bad input


def write(tmp_path: Path, source: str, name: str = "model.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def test_missing_file(tmp_path: Path) -> None:
    assert_clean_error(invoke(str(tmp_path / "nope.py")), "nope.py", "no such model file")


def test_import_error_shows_the_users_line(tmp_path: Path) -> None:
    path = write(tmp_path, "import torch\nimport surely_not_a_module_xyz\n")
    assert_clean_error(
        invoke(path),
        "importing the model file failed: ModuleNotFoundError",
        "line 2",
        "import surely_not_a_module_xyz",
    )


def test_missing_factory_lists_the_functions(tmp_path: Path) -> None:
    path = write(tmp_path, "def make():\n    pass\n\ndef example_input():\n    pass\n")
    assert_clean_error(invoke(path), "no function build_model()", "example_input, make")
    assert_clean_error(invoke(path, "--factory", "nope"), "no function nope()")


def test_factory_that_raises(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        def build_model():
            raise ValueError("depth must be positive")
        """,
    )
    assert_clean_error(
        invoke(path), "build_model() failed: ValueError: depth must be positive",
        'raise ValueError("depth must be positive")',
    )  # fmt: skip


def test_factory_returning_something_else(tmp_path: Path) -> None:
    path = write(tmp_path, "def build_model():\n    return 3\n")
    assert_clean_error(invoke(path), "returned int, expected a torch.nn.Module")


def test_no_example_input(tmp_path: Path) -> None:
    path = write(tmp_path, "import torch\ndef build_model():\n    return torch.nn.Linear(2, 2)\n")
    assert_clean_error(invoke(path), "no example input", "--input-shape")
    result = invoke(path, "--input-shape", "4,2")  # a bare Linear: both tensors scale-sensitive
    assert result.exit_code == EXIT_OK, result.stderr
    assert "--input-shape 4,2" in result.stdout


def test_wrong_input_shape_shows_the_failing_forward_line() -> None:
    result = invoke(model("cases.py:conv_relu_maxpool_bn"), "--input-shape", "2,5,8,8")
    assert_clean_error(
        result,
        "the forward pass on the example input ((2, 5, 8, 8)) failed: RuntimeError",
        "cases.py",
        "F.max_pool2d(F.relu(self.conv(x)), 2)",
    )


def test_bad_input_shape_text() -> None:
    assert_clean_error(invoke(model("cases.py"), "--input-shape", "8,a"), "--input-shape")
    assert_clean_error(invoke(model("cases.py"), "--input-shape", "0,3"), "--input-shape")


def test_cuda_without_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert_clean_error(invoke(model("cases.py"), "--device", "cuda"), "--device cuda")


def test_fx_only_on_data_dependent_control_flow() -> None:
    assert_clean_error(invoke(model("data_dependent.py"), "--trace", "fx"), "--trace execution")


def test_unknown_format_is_a_usage_error() -> None:
    result = invoke(model("cases.py"), "--format", "yaml")
    assert result.exit_code == EXIT_BAD_INPUT
    assert result.stdout == ""


# --------------------------------------------------------------------------- help, imports


def test_every_option_has_help() -> None:
    command = typer.main.get_command(app).commands["verify-invariance"]  # type: ignore[attr-defined]
    for param in command.params:
        assert getattr(param, "help", None), param.name
    assert command.help


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from bnwd_cli.cli.app import app\n"
        "r = CliRunner().invoke(app, ['verify-invariance', '--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert '--checkpoint' in r.stdout\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- golden table


def _golden_report() -> InvarianceReport:
    """A fixed report (no live numbers), so the golden file holds across machines."""
    conv = ParamClassification(
        "conv.weight", (8, 3, 3, 3), ParamKind.SCALE_INVARIANT, Granularity.PER_ROW,
        ("bn",), path=("conv", "relu", "bn"), method=ClassificationMethod.FX_SYMBOLIC,
    )  # fmt: skip
    gamma = ParamClassification(
        "bn.weight", (8,), ParamKind.NORM_AFFINE, norm_layers=("bn",),
        method=ClassificationMethod.FX_SYMBOLIC,
    )  # fmt: skip
    a = ParamClassification(
        "a.weight", (8, 8), ParamKind.SCALE_INVARIANT, Granularity.JOINT, ("ln",), 0,
        method=ClassificationMethod.FX_SYMBOLIC,
    )  # fmt: skip
    b = replace_name(a, "b.weight")
    head = ParamClassification(
        "fc.weight", (5, 8), ParamKind.SCALE_SENSITIVE, method=ClassificationMethod.FX_SYMBOLIC
    )
    classification = ModelClassification(
        (conv, gamma, a, b, head),
        ClassificationMethod.FX_SYMBOLIC,
        joint_groups=(("a.weight", "b.weight"),),
    )
    invariant = NumericResult(
        NumericVerdict.INVARIANT,
        3.1e-16,
        3,
        2.5e-05,
        1.2e-17,
        4e-06,
        2.2e-16,
        3.3e-05,
        1.5e-15,
        1.7,
    )
    eps = NumericResult(
        NumericVerdict.EPS_LIMITED, 4.2e-16, 3, 0.034, -2.0e-16, 0.0021, None, None, 2e-15, 0.9
    )
    sensitive = NumericResult(NumericVerdict.NOT_INVARIANT, euler_cos=-0.13, influence=2.2)
    records = (
        ParamVerification(conv, invariant, Agreement.AGREE),
        ParamVerification(
            gamma, NumericResult(NumericVerdict.NOT_CHECKED), Agreement.NOT_APPLICABLE
        ),
        ParamVerification(a, eps, Agreement.AGREE),
        ParamVerification(b, eps, Agreement.AGREE),
        ParamVerification(head, sensitive, Agreement.AGREE),
    )
    return InvarianceReport(
        classification, records,
        (JointGroupCheck(0, ("a.weight", "b.weight"), NumericVerdict.EPS_LIMITED, 4.2e-16,
                         Agreement.AGREE),),
        "cpu", FLOAT64, 4, 3, 0, model="model.py:build_model", input="(4, 3, 8, 8) from example_input()",
    )  # fmt: skip


def replace_name(p: ParamClassification, name: str) -> ParamClassification:
    from dataclasses import replace

    return replace(p, name=name)


def test_table_golden_file(update_golden: bool) -> None:
    text = render_table(_golden_report(), width=140)
    assert "\x1b[" not in text
    if update_golden:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text, encoding="utf-8")
    golden = GOLDEN.read_text(encoding="utf-8")
    assert text == golden, "table changed: review, then re-run pytest with --update-golden"
    # not only a copy of the output: the rows say what the report says
    rows = {
        line.split()[0]: line
        for line in golden.splitlines()
        if line.startswith(" ") and line.strip()
    }
    assert re.search(r"8×3×3×3\s+scale-invariant\s+per-row\s+bn\s+invariant\s+output 3\.1e-16, "
                     r"row cos 2\.2e-16\s+agree", rows["conv.weight"])  # fmt: skip
    assert re.search(r"joint #0\s+ln\s+invariant up to eps\s+at model eps: output 3\.4e-02, "
                     r"cos 2\.1e-03\s+agree", rows["a.weight"])  # fmt: skip
    assert re.search(r"scale-sensitive\s+-\s+-\s+not invariant\s+cos 1\.3e-01\s+agree",
                     rows["fc.weight"])  # fmt: skip
    assert "RESULT: graph and numbers agree (4 agree, 0 disagree, 0 no evidence, 1 n/a)" in golden
