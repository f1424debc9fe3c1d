"""Parts of a run in progress: one file per task with its fields, a done marker per field."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

from cellmi.errors import UserError
from cellmi.infer.parts import FieldResult, done_names, pack, read_parts, unpack, write_parts
from cellmi.store import filesystem, join


def _result(sample: str, field: str, rows: int, seed: int, focus: float = 0.5, cover: float = 0.3) -> FieldResult:
    rng = np.random.default_rng(seed)
    return FieldResult(
        sample,
        field,
        rng.integers(0, 500, rows).astype(np.int32),
        rng.integers(0, 500, rows).astype(np.int32),
        rng.random(rows).astype(np.float32),
        rng.random(rows) < 0.2,
        {"dim": rng.normal(size=(rows, 6)).astype(np.float32), "handcrafted": rng.normal(size=(rows, 4))},
        focus,
        cover + seed / 100,
    )


def _same(a: FieldResult, b: FieldResult) -> None:
    assert (a.sample, a.field) == (b.sample, b.field)
    for name in ("y", "x", "fg_fraction", "background"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.features.keys() == b.features.keys()
    for key in a.features:
        np.testing.assert_array_equal(a.features[key], b.features[key], err_msg=key)
    for name in ("focus", "cover"):
        assert getattr(a, name) == getattr(b, name) or np.isnan([getattr(a, name), getattr(b, name)]).all(), name


def _roundtrip(url: str) -> None:
    results = [_result("S00", "1", 5, 0), _result("S00", "2", 0, 1, float("nan")), _result("S01", "1", 3, 2)]
    write_parts(url, results, run_id="r1")
    write_parts(url, [_result("S02", "1", 2, 3)], run_id="r1")
    fs, path = filesystem(url)
    names = sorted(os.path.basename(p) for p in fs.ls(path))
    attempts = [n for n in names if n.endswith(".npz")]  # one file per task (named after its first field)
    assert len(attempts) == 2 and attempts[0].startswith("S00_1.") and attempts[1].startswith("S02_1.")
    assert done_names(url) == {"S00_1", "S00_2", "S01_1", "S02_1"}
    assert done_names(url, ["S01_1", "S09_1"]) == {"S01_1"}  # only the names asked about
    got = read_parts(url, ["S00_1", "S00_2", "S01_1", "S02_1"])
    for want in [*results, _result("S02", "1", 2, 3)]:
        _same(got[want.name], want)


def test_a_task_writes_one_file_for_its_fields(tmp_path):
    _roundtrip(str(tmp_path / "parts"))


def test_parts_on_s3_are_written_and_read_the_same(s3_env):
    _roundtrip(f"{s3_env}/run/parts")


def test_a_part_that_does_not_match_its_marker_is_refused(tmp_path):
    url = str(tmp_path / "parts")
    write_parts(url, [_result("S00", "1", 4, 0), _result("S00", "2", 4, 1)], run_id="r1")
    (attempt,) = [p for p in os.listdir(url) if p.endswith(".npz")]
    with open(join(url, attempt), "ab") as handle:
        handle.write(b"!")
    with pytest.raises(UserError, match="part does not match its done marker"):
        read_parts(url, ["S00_2"])


def test_the_one_field_layout_of_earlier_runs_is_still_read():
    """Parts of an interrupted run written before tasks shared a file: one field, no offsets."""
    want = _result("S00", "1", 3, 0, float("nan"), float("nan"))
    buffer = io.BytesIO()
    np.savez(
        buffer,
        sample=np.array("S00"),
        field=np.array("1"),
        y=want.y,
        x=want.x,
        fg_fraction=want.fg_fraction,
        background=want.background,
        **{f"feature_{k}": v for k, v in want.features.items()},
    )
    (got,) = unpack(buffer.getvalue())
    _same(got, want)


def test_parts_written_before_the_cover_was_measured_read_it_as_missing():
    buffer = io.BytesIO(pack([_result("S00", "1", 3, 0)]))
    with np.load(buffer) as npz:
        arrays = {k: npz[k] for k in npz.files if k != "cover"}
    older = io.BytesIO()
    np.savez(older, **arrays)
    (got,) = unpack(older.getvalue())
    assert got.focus == 0.5 and np.isnan(got.cover)
