"""The file helpers every output goes through: atomic writes (a hidden sibling renamed over the
target), JSON without NaN, figures in their suffix's format, what cannot be parsed moved aside
under a name that says why and when, and the file walk the artifact cache verifies entries with."""

from __future__ import annotations

import json
import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

from fluxopt import files
from fluxopt.files import dir_size, move_aside, save_figure_atomic, walk_files, write_atomic, write_json_atomic


def test_a_write_goes_through_a_hidden_sibling_and_creates_missing_parents(tmp_path):
    target = tmp_path / "a" / "b" / "result.json"
    seen = []

    def write(handle):
        seen.extend(p.name for p in target.parent.iterdir())
        handle.write(b"{}")

    write_atomic(target, write)
    # beside the target, so the rename is atomic (one file system), and hidden from a reader
    assert len(seen) == 1 and seen[0].startswith(".result.json.") and seen[0].endswith(".tmp")
    assert [p.name for p in target.parent.iterdir()] == ["result.json"] and target.read_bytes() == b"{}"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")

    def fail(handle):
        handle.write(b"half")
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        write_atomic(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_json_stores_nan_and_inf_as_null_and_stays_readable(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"a": math.nan, "b": [math.inf, 1.5], "c": (1, -math.inf), "d": {"e": math.nan}})
    text = path.read_text()
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": [1, None], "d": {"e": None}}
    assert text.endswith("}\n") and '\n  "a": null' in text  # indented for a reader and a diff


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_a_figure_is_saved_in_the_format_its_suffix_names(tmp_path, suffix, magic):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(2, 1))
    path = tmp_path / f"plot{suffix}"
    save_figure_atomic(path, figure, dpi=50)
    plt.close(figure)
    assert path.read_bytes().startswith(magic)
    if suffix == ".png":
        from PIL import Image

        assert Image.open(path).size == (100, 50)  # the keyword arguments reach savefig


def test_what_is_moved_aside_is_named_for_why_and_when_and_never_overwritten(tmp_path, monkeypatch):
    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            assert tz is timezone.utc
            return datetime(2026, 12, 3, 21, 5, 9, tzinfo=timezone.utc)

    monkeypatch.setattr(files, "datetime", Frozen)
    names = []
    for content in ("first", "second", "third"):
        path = tmp_path / "result.json"
        path.write_text(content)
        names.append(move_aside(path, "unreadable").name)
    assert names == ["result.unreadable-20261203T210509.json", "result.unreadable-20261203T210509-1.json",
                     "result.unreadable-20261203T210509-2.json"]
    assert [(tmp_path / n).read_text() for n in names] == ["first", "second", "third"]


def test_the_stamp_of_a_moved_file_is_now_in_utc(tmp_path):
    path = tmp_path / "summary.md"
    path.write_text("x")
    moved = move_aside(path, "edited")
    stamp = re.fullmatch(r"summary\.edited-(\d{8}T\d{6})\.md", moved.name).group(1)
    when = datetime.strptime(stamp, "%Y%m%dT%H%M%S").replace(tzinfo=timezone.utc)
    assert abs((datetime.now(timezone.utc) - when).total_seconds()) < 60


def test_links_to_directories_are_listed_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(b"s" * 10)
    root = tmp_path / "entry"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"aaa")
    (root / "sub" / "b.txt").write_bytes(b"bb")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "dangling").symlink_to(tmp_path / "gone")
    listed = dict(walk_files(root))
    # a verifier sees the link itself (and refuses it), never what it points to
    assert sorted(listed) == ["a.txt", "dangling", "linked", "sub/b.txt"]
    assert listed["linked"] == root / "linked"
    links = os.lstat(root / "linked").st_size + os.lstat(root / "dangling").st_size
    assert dir_size(root) == 3 + 2 + links
