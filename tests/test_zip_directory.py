"""The central-directory reader of torch zip files (`mapped._zip_directory`) against `zipfile`.

It must list exactly what `zipfile` lists (offset, size, compression, flags of every member) or
decline (None, and `zipfile` reads the archive): never a different answer.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bnwd_cli.checkpoints.mapped import (
    MappedFile,
    NotMappableError,
    _zip64_fields,
    _zip_directory,
    load_torch_zip,
)

FIXTURES = Path(__file__).parent / "fixtures"
REAL_ZIPS = sorted(p for p in FIXTURES.rglob("*") if p.is_file() and zipfile.is_zipfile(p))


def zipfile_listing(path: Path) -> dict[str, tuple[int, int, int, int]]:
    with zipfile.ZipFile(path) as archive:
        return {
            i.filename: (i.header_offset, i.file_size, i.compress_type, i.flag_bits)
            for i in archive.infolist()
        }


def listing(path: Path) -> dict[str, tuple[int, int, int, int]] | None:
    file = MappedFile(path)
    try:
        return _zip_directory(file)
    finally:
        file.finish_reading()


def test_fixtures_hold_torch_zips() -> None:
    assert len(REAL_ZIPS) >= 20  # Lightning, HF Trainer, timm and torch.save files


@pytest.mark.parametrize("path", REAL_ZIPS, ids=lambda p: str(p.relative_to(FIXTURES)))
def test_real_library_files_list_as_zipfile_lists_them(path: Path) -> None:
    assert listing(path) == zipfile_listing(path)


def test_zip64_records_and_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With zipfile's zip64 limit lowered to 8 bytes it writes a zip64 end record and zip64
    fields for every size and offset past that: the reader takes them from there."""
    path = tmp_path / "z64.zip"
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 8)
    with zipfile.ZipFile(path, "w", allowZip64=True) as archive:
        archive.writestr("a/data.pkl", b"x" * 100)
        archive.writestr("a/data/0", b"y" * 1000)
        archive.writestr("a/tiny", b"z")
    monkeypatch.undo()
    got = listing(path)
    assert got is not None and got == zipfile_listing(path)
    assert got["a/data/0"][1] == 1000 and got["a/data/0"][0] > 8


def test_zip64_fields_are_read_in_order() -> None:
    extra = (
        (0x5455).to_bytes(2, "little") + (5).to_bytes(2, "little") + b"12345"
        + (1).to_bytes(2, "little") + (16).to_bytes(2, "little")
        + (2**40).to_bytes(8, "little") + (7).to_bytes(8, "little")
    )  # fmt: skip
    assert _zip64_fields(extra) == [2**40, 7]
    assert _zip64_fields(extra[:-3]) is None  # cut short: zipfile refuses it
    assert _zip64_fields(extra[:9]) == []  # no zip64 field
    assert _zip64_fields(b"") == []


def test_unusual_archives_are_left_to_zipfile(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a/data.pkl", b"x" * 10)
    data = buffer.getvalue()
    commented = tmp_path / "commented.zip"
    with zipfile.ZipFile(commented, "w") as archive:
        archive.writestr("a/data.pkl", b"x" * 10)
        archive.comment = b"a comment"
    assert listing(commented) == zipfile_listing(commented)  # a comment that ends the file
    prefixed = tmp_path / "prefixed.zip"
    prefixed.write_bytes(b"#!/bin/sh\n" + data)  # bytes before the archive: offsets move
    assert listing(prefixed) is None
    assert zipfile_listing(prefixed)  # zipfile reads it
    trailing = tmp_path / "trailing.zip"
    trailing.write_bytes(data + b"junk")
    assert listing(trailing) is None


def test_mutated_directories_never_give_another_answer(tmp_path: Path) -> None:
    """Flipped bytes in the directory and the end records: whatever the reader accepts,
    zipfile reads the same way."""
    source = tmp_path / "model.pt"
    torch.save({"w": torch.arange(6.0), "b": torch.ones(3)}, source)
    original = source.read_bytes()
    start = original.rfind(b"PK\x01\x02", 0, original.rfind(b"PK\x05\x06"))
    directory = original.find(b"PK\x01\x02")
    rng = np.random.default_rng(7)
    accepted = 0
    for trial in range(300):
        data = bytearray(original)
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(min(directory, start), len(data)))
            data[at] = int(rng.integers(256))
        path = tmp_path / f"m{trial}.pt"
        path.write_bytes(bytes(data))
        try:
            got = listing(path)
        except NotMappableError:
            got = None
        if got is None:
            continue
        accepted += 1
        assert got == zipfile_listing(path), trial
    assert accepted > 0  # (some flips land in fields that do not matter)


def test_truncated_files_are_refused(tmp_path: Path) -> None:
    source = tmp_path / "model.pt"
    torch.save({"w": torch.arange(6.0)}, source)
    data = source.read_bytes()
    for cut in (len(data) - 1, len(data) - 22, len(data) // 2, 30):
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(data[:cut])
        assert listing(path) is None
        with pytest.raises(NotMappableError):
            load_torch_zip(path)
