"""``fluxopt-cache`` as careful as the cache: an age that would remove everything (or nothing) is
refused, a cache directory that is not there is an error (not "(empty)"), prune never removes an
entry this fluxopt can use, and every removal is listed."""

from __future__ import annotations

import pytest

from fluxopt import plugins
from fluxopt.artifacts import ArtifactCache
from fluxopt.cli.cache import main
from fluxopt.models import local_model_dir


@pytest.mark.parametrize("days", ["-1", "-inf", "inf", "nan", "abc", "-0.5"])
def test_older_than_must_be_a_finite_number_of_days(tmp_path, days, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--cache-dir", str(tmp_path), "prune", f"--older-than={days}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1
    assert f"--older-than={days} is not allowed: a finite number of days >= 0" in err[0]


@pytest.mark.parametrize("command", [["ls"], ["prune"], ["rm", "--all"]])
@pytest.mark.parametrize("what", ["missing", "file"])
def test_a_cache_dir_that_is_not_a_directory_is_an_error(tmp_path, capsys, command, what):
    target = tmp_path / "cache"
    if what == "file":
        target.write_text("not a cache")
    with pytest.raises(SystemExit) as stop:
        main(["--cache-dir", str(target), *command])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1
    assert f"--cache-dir={target} {'does not exist' if what == 'missing' else 'is not a directory'}" in err[0]
    assert (target.is_file()) is (what == "file")


def test_prune_keeps_the_checkpoint_it_just_built_and_lists_what_it_removes(tmp_path, capsys):
    directory = local_model_dir(plugins.model("tiny"), tmp_path)
    stale = ArtifactCache(tmp_path).root / "artifacts" / "demo" / "leftover"
    stale.mkdir(parents=True)  # an entry without a manifest: incomplete, removable
    assert main(["--cache-dir", str(tmp_path), "prune"]) == 0
    out = capsys.readouterr().out
    assert directory.is_dir() and any(directory.rglob("*.safetensors"))
    assert "model/" not in out
    assert main(["--cache-dir", str(tmp_path), "prune", "--older-than=0"]) == 0  # age alone: then it may go
    assert "model/" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["artifacts", "artifacts/model"])
def test_a_file_where_the_cache_needs_a_directory_is_named_with_the_setting(tmp_path, where):
    from fluxopt.artifacts import CacheLayoutError

    (tmp_path / where).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / where).write_text("in the way")
    with pytest.raises(CacheLayoutError) as info:
        local_model_dir(plugins.model("tiny"), tmp_path)
    assert f"has a file where a directory is needed: {tmp_path / where};" in str(info.value)
    assert "cache.dir" in str(info.value) and info.value.exit_status == 1


# --------------------------------------------------------------------------- export / import
def _entry(root, kind: str, payload: bytes, device_key: dict | None = None):
    from fluxopt.artifacts import entry_key
    from fluxopt.environment import detect_device

    key = {**entry_key({"what": kind}, detect_device("cpu")), **(device_key or {})}
    return ArtifactCache(root).get(kind, key, lambda tmp: (tmp / "blob.bin").write_bytes(payload)).path


def test_an_export_imported_elsewhere_is_verified_and_loads(tmp_path, capsys):
    source, target = tmp_path / "a", tmp_path / "b"
    entry = _entry(source, "compile", b"compiled" * 1000)
    _entry(source, "calibration", b"scales")
    archive = tmp_path / "cache.tar.gz"
    assert main(["--cache-dir", str(source), "export", str(archive)]) == 0
    assert "exported 2 entries" in capsys.readouterr().out
    assert main(["--cache-dir", str(source), "export", str(archive)]) == 2  # never overwrites
    assert main(["--cache-dir", str(target), "import", str(archive)]) == 0
    assert "imported 2 entries" in capsys.readouterr().out
    moved = target / "artifacts" / "compile" / entry.name
    assert ArtifactCache(target).verify(moved).valid and (moved / "blob.bin").read_bytes() == b"compiled" * 1000
    assert main(["--cache-dir", str(target), "import", str(archive)]) == 0
    assert "imported 0 entries into" in (again := capsys.readouterr().out) and "(2 already there, 0 rejected)" in again
    assert not list(target.glob(".import-*"))  # the staging directory is gone


def test_import_rejects_damaged_and_foreign_entries_and_what_is_no_export(tmp_path, capsys):
    import io
    import tarfile

    source = tmp_path / "a"
    _entry(source, "compile", b"good")
    _entry(source, "other_gpu", b"x", {"device": {"name": "NVIDIA H200", "type": "cuda"}})
    archive = tmp_path / "cache.tar.gz"
    assert main(["--cache-dir", str(source), "export", str(archive)]) == 0
    assert "not exported: other_gpu/" in capsys.readouterr().out  # built for another device
    # damage the payload inside the archive: the checksum no longer matches the manifest
    damaged = tmp_path / "damaged.tar.gz"
    with tarfile.open(archive) as src, tarfile.open(damaged, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None
            if member.name.endswith("blob.bin"):
                data = b"evil"
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    target = tmp_path / "b"
    assert main(["--cache-dir", str(target), "import", str(damaged)]) == 1
    out = capsys.readouterr().out
    assert "rejected compile/" in out and "checksum mismatch in blob.bin" in out
    assert not (target / "artifacts" / "compile").exists() or not any((target / "artifacts" / "compile").iterdir())
    plain = tmp_path / "plain.tar.gz"
    with tarfile.open(plain, "w:gz") as tar:
        tar.add(archive, arcname="something")
    assert main(["--cache-dir", str(target), "import", str(plain)]) == 2
    assert "is not a fluxopt-cache export" in capsys.readouterr().err
