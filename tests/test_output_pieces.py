"""`bnwd inspect`'s CSV and JSON are written a layer at a time (`render_pieces`, `emit`):

- the pieces join to the text of the whole-document writers (`dumps` of `report_document`, and
  the CSV's rows, read back);
- the memory they take at their peak stays near one layer's, however many layers a report has,
  where the whole document's grows with them;
- `emit` writes pieces to stdout with the same final newline as a text, and a file only whole:
  a failure half-way leaves the file as it was and no temporary file behind.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from bnwd_cli.metrics.dynamics import RunDynamics, analyze_run
from bnwd_cli.render.dynamics import (
    CSV_COLUMNS,
    render_csv_pieces,
    render_json_pieces,
    render_pieces,
    report_document,
)
from bnwd_cli.render.output import OutputFormat, emit
from bnwd_cli.render.serialize import dumps

SAMPLE_RUN = Path(__file__).resolve().parent.parent / "sample_checkpoints" / "sgd_no_conv_wd"


@pytest.fixture(scope="module")
def report() -> RunDynamics:
    return analyze_run(SAMPLE_RUN)


def test_json_pieces_join_to_the_whole_document(report: RunDynamics) -> None:
    pieces = list(render_json_pieces(report))
    assert "".join(pieces) == dumps(report_document(report))
    assert len(pieces) == len(report.layers) + 1


def test_csv_pieces_hold_a_row_per_layer_and_checkpoint(report: RunDynamics) -> None:
    text = "".join(render_csv_pieces(report))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == list(CSV_COLUMNS)
    expected = [(p.checkpoint, layer.name) for layer in report.layers for p in layer.points]
    assert [(int(r["checkpoint"]), r["layer"]) for r in rows] == expected
    by_key = {(int(r["checkpoint"]), r["layer"]): r for r in rows}
    for layer in report.layers:
        for p in layer.points:
            assert float(by_key[p.checkpoint, layer.name]["norm"]) == p.norm


def peak_bytes(pieces: Callable[[], Iterable[str]]) -> tuple[int, int]:
    """Peak traced allocation while the pieces are made and dropped, and their total length."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        total = sum(len(piece) for piece in pieces())
        return tracemalloc.get_traced_memory()[1] - base, total
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_pieces_take_one_layers_memory_not_the_runs(report: RunDynamics, fmt: str) -> None:
    """Eight times the layers: eight times the text, about the same peak (the whole document's
    peak grows eightfold, which shows the measurement can tell)."""
    larger = replace(report, layers=report.layers * 8)
    render = render_json_pieces if fmt == "json" else render_csv_pieces
    peak, total = peak_bytes(lambda: render(report))
    larger_peak, larger_total = peak_bytes(lambda: render(larger))
    assert larger_total > 7.5 * total
    assert larger_peak < 1.5 * peak
    whole, _ = peak_bytes(lambda: [dumps(report_document(report))])
    larger_whole, _ = peak_bytes(lambda: [dumps(report_document(larger))])
    assert larger_whole > 6 * whole


def test_tables_come_whole(report: RunDynamics) -> None:
    assert len(list(render_pieces(report, OutputFormat.MARKDOWN))) == 1


def test_emit_writes_pieces_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    emit(iter(["{", "", '"a": 1}']), None)
    assert capsys.readouterr().out == '{"a": 1}\n'  # the newline a text would get
    emit(iter(["x\n", ""]), None)
    assert capsys.readouterr().out == "x\n"


def test_emit_to_a_file_is_whole_or_nothing(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("previous report\n")

    def failing() -> Iterator[str]:
        yield "{"
        raise RuntimeError("rendering failed half-way")

    with pytest.raises(RuntimeError):
        emit(failing(), target)
    assert target.read_text() == "previous report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    emit(render_json_pieces(analyze_run(SAMPLE_RUN)), target)
    assert json.loads(target.read_text())["layers"]
