"""The artifact cache: keys, manifests and checksums, corrupt/foreign/unsafe entries, locking
between processes, permissions, ``StackContext.artifact`` and ``fluxopt-cache``."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fluxopt import artifacts
from fluxopt.artifacts import MANIFEST, ArtifactCache, entry_key, key_digest
from fluxopt import Shapes, StackContext
from fluxopt.cli.cache import main as cache_main
from fluxopt.files import private_dir
from fluxopt.environment import DeviceInfo, detect_device

REPO = Path(__file__).resolve().parent.parent
H100 = DeviceInfo(type="cuda", name="NVIDIA H100 80GB HBM3", capability=(9, 0))
KEY = {"backend": "demo", "model": "tiny", "options": {"a": 1}}


def write_files(tmp: Path, payload: bytes = b"compiled-bytes" * 100) -> None:
    (tmp / "model.pt2").write_bytes(payload)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "info.json").write_text('{"x": 1}')


class Builder:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, tmp: Path) -> None:
        self.calls += 1
        write_files(tmp)


@pytest.fixture
def cache(tmp_path: Path) -> ArtifactCache:
    return ArtifactCache(tmp_path / "cache")


@pytest.fixture
def device() -> DeviceInfo:
    return detect_device("auto")


# ---------------------------------------------------------------------------------- keys
def test_key_changes_with_gpu_versions_options_and_format(monkeypatch):
    base = key_digest(entry_key(KEY, H100))
    assert base == key_digest(entry_key(dict(KEY), H100))  # deterministic
    a100 = DeviceInfo(type="cuda", name="NVIDIA A100-SXM4-80GB", capability=(8, 0))
    assert key_digest(entry_key(KEY, a100)) != base
    same_name_other_cc = DeviceInfo(type="cuda", name=H100.name, capability=(9, 1))
    assert key_digest(entry_key(KEY, same_name_other_cc)) != base
    assert key_digest(entry_key({**KEY, "options": {"a": 2}}, H100)) != base
    assert key_digest(entry_key({**KEY, "shapes": {"height": 512}}, H100)) != base

    environment = artifacts  # the cache key reads the versions through the name it imported

    real = environment.package_versions()
    monkeypatch.setattr(environment, "package_versions", lambda: {**real, "torch": "9.9.9"})
    assert key_digest(entry_key(KEY, H100)) != base
    monkeypatch.setattr(environment, "package_versions", lambda: {**real, "diffusers": "0.0.1"})
    assert key_digest(entry_key(KEY, H100)) != base
    monkeypatch.setattr(environment, "package_versions", lambda: real)
    monkeypatch.setattr(artifacts, "CACHE_FORMAT_VERSION", artifacts.CACHE_FORMAT_VERSION + 1)
    assert key_digest(entry_key(KEY, H100)) != base


def test_full_key_records_device_runtime_and_versions():
    full = entry_key(KEY, H100)
    assert full["device"] == {"type": "cuda", "name": H100.name, "capability": [9, 0], "rocm": False}
    assert full["versions"]["torch"]
    assert full["versions"]["diffusers"] and full["cache_format"] == artifacts.CACHE_FORMAT_VERSION
    assert "python" in full["runtime"] and "cuda" in full["runtime"]


# ---------------------------------------------------------------------------------- entries
def test_build_once_then_hit_with_manifest_and_private_permissions(cache, device):
    build = Builder()
    full = entry_key(KEY, device)
    first = cache.get("demo", full, build)
    second = cache.get("demo", full, build)
    assert build.calls == 1
    assert (first.built, first.cache_hit) == (True, False) and (second.built, second.cache_hit) == (False, True)
    assert first.path == second.path and first.path.name == key_digest(full)
    manifest = json.loads((first.path / MANIFEST).read_text())
    assert manifest["key"] == full and set(manifest["files"]) == {"model.pt2", "sub/info.json"}
    assert manifest["files"]["model.pt2"]["size"] == 1400 and len(manifest["files"]["model.pt2"]["sha256"]) == 64
    for directory in (cache.artifacts_dir, first.path.parent, first.path, first.path / "sub"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert directory.stat().st_uid == os.getuid()
    for f in (first.path / "model.pt2", first.path / MANIFEST):
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0
    assert not [p for p in first.path.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_a_miss_names_the_fields_the_nearest_entry_was_keyed_by_differently(cache, device, caplog):
    """A build the user expected to be warm says why it was cold, in the log and the stats."""
    assert cache.get("demo", entry_key(KEY, device), Builder()).nearest is None  # nothing to compare with
    cache.get("demo", entry_key({**KEY, "model": "other", "options": {"mode": "x"}}, device), Builder())
    caplog.set_level(logging.INFO, logger="fluxopt.artifacts")
    miss = cache.get("demo", entry_key({**KEY, "options": {**KEY["options"], "mode": "max"}}, device), Builder())
    assert miss.built and miss.nearest is not None
    assert miss.nearest.endswith("differing in options.mode") and miss.to_stats()["nearest"] == miss.nearest
    assert key_digest(entry_key(KEY, device)) in miss.nearest and "options.mode" in caplog.text


def test_failed_build_leaves_nothing_that_could_be_loaded(cache, device):
    def broken(tmp: Path) -> None:
        (tmp / "model.pt2").write_bytes(b"half")
        raise RuntimeError("compiler crashed")

    full = entry_key(KEY, device)
    with pytest.raises(RuntimeError, match="compiler crashed"):
        cache.get("demo", full, broken)
    kind_dir = cache.artifacts_dir / "demo"
    assert not (kind_dir / key_digest(full)).exists()
    assert [p.name for p in kind_dir.iterdir()] == [key_digest(full) + ".lock"]
    build = Builder()
    assert cache.get("demo", full, build).built and build.calls == 1


def _flip_byte(entry: Path) -> None:
    path = entry / "model.pt2"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(entry: Path) -> None:
    with open(entry / "model.pt2", "r+b") as handle:
        handle.truncate(100)


def _edit_manifest_checksum(entry: Path) -> None:
    manifest = json.loads((entry / MANIFEST).read_text())
    manifest["files"]["sub/info.json"]["sha256"] = "0" * 64
    (entry / MANIFEST).write_text(json.dumps(manifest))


def _edit_manifest_key(entry: Path) -> None:
    manifest = json.loads((entry / MANIFEST).read_text())
    manifest["key"]["options"] = {"a": 99}
    (entry / MANIFEST).write_text(json.dumps(manifest))


def _garble_manifest(entry: Path) -> None:
    (entry / MANIFEST).write_text("{not json")


def _drop_manifest(entry: Path) -> None:
    (entry / MANIFEST).unlink()


def _delete_file(entry: Path) -> None:
    (entry / "sub" / "info.json").unlink()


def _add_file(entry: Path) -> None:
    (entry / "evil.so").write_bytes(b"\x7fELF")


def _group_writable(entry: Path) -> None:
    os.chmod(entry / "model.pt2", 0o664)


def _world_writable_dir(entry: Path) -> None:
    os.chmod(entry, 0o777)


def _symlinked_file(entry: Path) -> None:
    target = entry.parent / "elsewhere.bin"
    target.write_bytes((entry / "model.pt2").read_bytes())
    (entry / "model.pt2").unlink()
    (entry / "model.pt2").symlink_to(target)


def _world_writable_manifest(entry: Path) -> None:
    os.chmod(entry / MANIFEST, 0o666)


def _symlinked_manifest(entry: Path) -> None:
    target = entry.parent / "elsewhere.json"
    target.write_text((entry / MANIFEST).read_text())
    (entry / MANIFEST).unlink()
    (entry / MANIFEST).symlink_to(target)


CORRUPTIONS = {
    "flipped byte": (_flip_byte, "checksum mismatch in model.pt2"),
    "truncated file": (_truncate, "truncated or changed file model.pt2"),
    "edited manifest checksum": (_edit_manifest_checksum, "checksum mismatch in sub/info.json"),
    "edited manifest key": (_edit_manifest_key, "key mismatch"),
    "garbled manifest": (_garble_manifest, "unreadable manifest"),
    "no manifest (partial)": (_drop_manifest, "incomplete entry (no manifest)"),
    "missing file": (_delete_file, "missing file sub/info.json"),
    "unexpected file": (_add_file, "unexpected file evil.so"),
    "group-writable file": (_group_writable, "group- or world-writable"),
    "world-writable entry": (_world_writable_dir, "group- or world-writable"),
    "symlinked file": (_symlinked_file, "symbolic link"),
    "world-writable manifest": (_world_writable_manifest, "group- or world-writable"),
    "symlinked manifest": (_symlinked_manifest, "symbolic link"),
}
# corruptions found once the manifest was read: the verdict still carries it, so that
# `fluxopt-cache ls` can say what a corrupt entry was built for
MANIFEST_READ = {"flipped byte", "truncated file", "edited manifest checksum", "edited manifest key",
                 "missing file", "unexpected file", "group-writable file", "symlinked file"}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_entry_is_detected_reported_and_rebuilt(cache, device, corruption, caplog):
    damage, reason = CORRUPTIONS[corruption]
    build = Builder()
    full = entry_key(KEY, device)
    entry = cache.get("demo", full, build).path
    damage(entry)
    verdict = cache.verify(entry, full)
    assert not verdict.valid and reason in verdict.reason
    if corruption in MANIFEST_READ:
        assert verdict.manifest is not None and verdict.manifest["files"]
        assert cache.inspect(entry).summary == artifacts.key_summary(verdict.manifest["key"]) != "-"
    else:
        assert verdict.manifest is None and cache.inspect(entry).summary == "-"
    with caplog.at_level(logging.WARNING, logger="fluxopt.artifacts"):
        again = cache.get("demo", full, build)
    assert build.calls == 2 and again.built and not again.cache_hit
    assert reason in again.rebuilt
    assert any(reason in r.getMessage() and "rebuilt" in r.getMessage() for r in caplog.records)
    assert cache.verify(again.path, full).valid
    assert (again.path / "model.pt2").read_bytes() == b"compiled-bytes" * 100
    assert stat.S_IMODE(again.path.stat().st_mode) == 0o700


def test_foreign_entry_under_our_name_is_never_loaded(cache, device):
    """An entry built for another key, copied under this key's name, fails the key check."""
    full = entry_key(KEY, device)
    other = cache.get("demo", entry_key({**KEY, "options": {"a": 2}}, device), Builder()).path
    target = cache.entry_path("demo", full)
    os.replace(other, target)
    assert "key mismatch" in cache.verify(target, full).reason
    build = Builder()
    result = cache.get("demo", full, build)
    assert build.calls == 1 and "key mismatch" in result.rebuilt


@pytest.mark.skipif(os.getuid() != 0, reason="changing a file's owner needs root")
def test_entry_owned_by_someone_else_is_refused(cache, device):
    full = entry_key(KEY, device)
    entry = cache.get("demo", full, Builder()).path
    os.chown(entry / "model.pt2", 4242, 4242)
    assert "owned by uid 4242" in cache.verify(entry, full).reason
    os.chown(entry / "model.pt2", 0, 0)
    os.chown(entry, 4242, 4242)
    build = Builder()
    result = cache.get("demo", full, build)
    assert build.calls == 1 and "owned by uid 4242" in result.rebuilt
    assert result.path.stat().st_uid == os.getuid()


def test_unsafe_kind_directory_is_refused(cache, device):
    full = entry_key(KEY, device)
    entry = cache.get("demo", full, Builder()).path
    os.chmod(entry.parent, 0o777)
    assert "group- or world-writable" in cache.verify(entry, full).reason


def test_leftover_temp_dir_of_killed_build_is_ignored_and_pruned(cache, device):
    full = entry_key(KEY, device)
    kind_dir = private_dir(cache.artifacts_dir / "demo")
    leftover = kind_dir / f".{key_digest(full)}.abc123"
    leftover.mkdir()
    write_files(leftover)
    build = Builder()
    assert cache.get("demo", full, build).built and build.calls == 1
    infos = {e.id: e for e in cache.entries()}
    assert infos[leftover.name].status == "incomplete"
    assert cache_main(["--cache-dir", str(cache.root), "prune"]) == 0
    assert not leftover.exists() and cache.entry_path("demo", full).exists()


def test_the_cache_lives_where_the_environment_says(monkeypatch, tmp_path):
    """$FLUXOPT_CACHE_DIR, else $XDG_CACHE_HOME/fluxopt, else ~/.cache/fluxopt."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FLUXOPT_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert artifacts.default_cache_dir() == tmp_path / "home" / ".cache" / "fluxopt"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert artifacts.default_cache_dir() == tmp_path / "xdg" / "fluxopt"
    monkeypatch.setenv("FLUXOPT_CACHE_DIR", "~/mine")
    assert artifacts.default_cache_dir() == tmp_path / "home" / "mine"


def test_kind_names_that_would_leave_the_cache_or_hide_are_refused(cache):
    for kind in ("", "a/b", "../x", ".hidden"):
        with pytest.raises(ValueError, match="bad artifact kind"):
            cache.entry_path(kind, KEY)
    assert cache.entry_path("aoti", KEY) == cache.artifacts_dir / "aoti" / key_digest(KEY)


def test_a_key_names_one_entry_whatever_the_order_of_its_fields():
    reordered = {"options": {"a": 1}, "model": "tiny", "backend": "demo"}
    assert key_digest(KEY) == key_digest(reordered) and len(key_digest(KEY)) == 24
    assert artifacts._normalise({"b": (1, 2), "a": {"y": 1, "x": torch.float32}}) == \
        {"a": {"x": "torch.float32", "y": 1}, "b": [1, 2]}
    assert list(artifacts._normalise({"b": 1, "a": 2})) == ["a", "b"]  # written into manifests sorted
    assert key_digest({"dtype": torch.float32}) == key_digest({"dtype": "torch.float32"})


def test_a_build_is_written_hidden_beside_its_entry_with_private_modes(cache, device):
    full = entry_key(KEY, device)
    target = cache.entry_path("demo", full)
    seen = []

    def build(tmp: Path) -> None:
        seen.append(tmp)
        write_files(tmp)
        (tmp / "run.sh").write_text("#!/bin/sh\n")
        os.chmod(tmp / "run.sh", 0o755)

    result = cache.get("demo", full, build)
    # beside the entry (one rename publishes it) and named so that `fluxopt-cache` knows a leftover
    assert seen[0].parent == target.parent and seen[0].name.startswith(f".{target.name}.")
    assert stat.S_IMODE((result.path / "model.pt2").stat().st_mode) == 0o600
    assert stat.S_IMODE((result.path / "run.sh").stat().st_mode) == 0o700
    manifest = json.loads((result.path / MANIFEST).read_text())
    assert manifest["kind"] == "demo" and manifest["summary"] == artifacts.key_summary(full)


def test_a_get_reports_its_times_and_the_entry_size(cache, device):
    from fluxopt.files import dir_size

    full = entry_key(KEY, device)

    def slow(tmp: Path) -> None:
        time.sleep(0.05)
        write_files(tmp)

    start = time.perf_counter()
    built = cache.get("demo", full, slow)
    elapsed = time.perf_counter() - start
    assert 0.05 <= built.build_s <= elapsed and 0 <= built.verify_s < built.build_s
    assert built.size_bytes == dir_size(built.path) > 1400 and built.waited_for_other_builder is False
    assert (built.rebuilt, built.nearest) == (None, None)
    stats = built.to_stats()
    assert stats == {"path": str(built.path), "cache_hit": False, "built": True, "verify_s": round(built.verify_s, 4),
                     "size_bytes": built.size_bytes, "build_s": round(built.build_s, 4)}
    hit = cache.get("demo", full, slow)
    assert 0 <= hit.verify_s <= time.perf_counter() - start - elapsed and hit.size_bytes == built.size_bytes
    assert hit.to_stats() == {"path": str(hit.path), "cache_hit": True, "built": False,
                              "verify_s": round(hit.verify_s, 4), "size_bytes": hit.size_bytes}


def test_looking_up_an_absent_entry_discards_nothing(cache, device, caplog):
    full = entry_key(KEY, device)
    with caplog.at_level(logging.WARNING, logger="fluxopt.artifacts"):
        assert cache.lookup("demo", full) == (None, None)
    assert not caplog.records
    entry = cache.get("demo", full, Builder()).path
    assert cache.lookup("demo", full) == (entry, None)
    _flip_byte(entry)
    with caplog.at_level(logging.WARNING, logger="fluxopt.artifacts"):
        assert cache.lookup("demo", full) == (None, "checksum mismatch in model.pt2")
    assert "discarding" in caplog.text and "checksum mismatch in model.pt2" in caplog.text and not entry.exists()


def test_an_entry_says_what_it_is_for_and_why_it_cannot_be_used_here(cache, device):
    from fluxopt.files import file_lock

    shapes = {"height": 64, "width": 48, "max_sequence_length": 128}
    full = entry_key({**KEY, "shapes": shapes, "dtype": "torch.bfloat16"}, H100)
    torch_version = full["versions"]["torch"]
    assert artifacts.key_summary(full) == f"tiny 64x48/seq128 bfloat16 NVIDIA H100 80GB HBM3 torch {torch_version}"
    assert artifacts.key_summary({}) == "- - torch -"  # a key without them says so, never "None"
    info = cache.inspect(cache.get("demo", full, Builder()).path)
    assert (info.kind, info.status, info.reason, info.building) == ("demo", "valid", None, False)
    assert info.stale_for(H100) is None
    assert info.stale_for(DeviceInfo(type="cpu", name="cpu")).startswith("built for another device ({")
    older = dict(info.key, versions={**info.key["versions"], "torch": "1.0.0", "diffusers": "0.1"})
    assert artifacts.EntryInfo(**{**info.__dict__, "key": older}).stale_for(H100) == \
        "built for other package versions (diffusers, torch)"
    portable = {k: v for k, v in info.key.items() if k not in ("device", "runtime", "versions")}
    assert artifacts.EntryInfo(**{**info.__dict__, "key": portable}).stale_for(DeviceInfo(type="cpu", name="c")) is None
    assert artifacts.EntryInfo(**{**info.__dict__, "key": None}).stale_for(H100) is None
    with file_lock(info.path.with_name(info.path.name + ".lock")):
        assert cache.inspect(info.path).building is True
    leftover = info.path.with_name(f".{info.path.name}.xyz")
    leftover.mkdir()
    (leftover / "part.bin").write_bytes(b"12345")
    left = cache.inspect(leftover)
    assert (left.status, left.reason, left.summary, left.size_bytes) == \
        ("incomplete", "leftover of an interrupted build", "-", 5)
    with file_lock(info.path.with_name(info.path.name + ".lock")):
        assert cache.inspect(leftover).building is True  # its build still holds the entry's lock


def test_ls_tells_an_unfinished_entry_from_a_corrupt_one_and_dates_it_by_its_build(cache, device):
    full = entry_key(KEY, device)
    entry = cache.get("demo", full, Builder()).path
    created = json.loads((entry / MANIFEST).read_text())["created"]
    os.utime(entry, (created - 5000, created - 5000))
    assert cache.inspect(entry).mtime == created
    _flip_byte(entry)
    assert cache.inspect(entry).status == "corrupt"
    _drop_manifest(entry)
    info = cache.inspect(entry)
    assert (info.status, info.reason, info.mtime) == ("incomplete", "incomplete entry (no manifest)", entry.lstat().st_mtime)


def test_a_removal_in_progress_is_listed_with_the_lock_of_its_entry(cache, device):
    from fluxopt.files import file_lock

    entry = cache.get("demo", entry_key(KEY, device), Builder()).path
    trash = entry.with_name(f".trash-{entry.name}-123-456")
    trash.mkdir()
    lock = entry.with_name(entry.name + ".lock")
    assert cache.inspect(trash).building is False
    with file_lock(lock):
        assert cache.inspect(trash).building is True and cache.inspect(trash).kind == "demo"


def test_removing_a_link_removes_the_link_only(cache, tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "data.bin").write_bytes(b"x")
    link = private_dir(cache.artifacts_dir / "demo") / "0123"
    link.symlink_to(kept, target_is_directory=True)
    ArtifactCache.remove(link)
    assert not link.is_symlink() and (kept / "data.bin").read_bytes() == b"x"
    assert [p.name for p in link.parent.iterdir()] == []


def test_stale_names_the_part_of_the_key_that_differs(cache, device):
    info = cache.inspect(cache.get("demo", entry_key(KEY, H100), Builder()).path)

    def stale(**changes):
        return artifacts.EntryInfo(**{**info.__dict__, "key": {**info.key, **changes}}).stale_for(H100)

    assert stale(cache_format=2) == "built for another cache format (2)"
    assert stale(runtime={**info.key["runtime"], "cuda": "9.9"}).startswith("built for another runtime ({")
    # a part the entry was keyed without is skipped, not the end of the check
    without_format = {k: v for k, v in info.key.items() if k != "cache_format"}
    other_gpu = {**without_format, "device": {**info.key["device"], "name": "NVIDIA A100"}}
    assert artifacts.EntryInfo(**{**info.__dict__, "key": other_gpu}).stale_for(H100).startswith("built for another device")
    # a package installed only here, or only when it was built, counts too
    assert stale(versions={**info.key["versions"], "extra-pkg": "1.0"}) == "built for other package versions (extra-pkg)"


# ---------------------------------------------------------------------------------- processes
CONCURRENT_BUILDER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from fluxopt.artifacts import ArtifactCache

    root, log_path, start_at = sys.argv[1], sys.argv[2], float(sys.argv[3])
    def build(tmp):
        with open(log_path, "a") as handle:
            handle.write(f"{os.getpid()}\\n")
        time.sleep(1.5)
        (tmp / "engine.bin").write_bytes(b"engine" * 1000)
    time.sleep(max(0.0, start_at - time.time()))
    result = ArtifactCache(Path(root)).get("demo", {"key": "same", "cache_format": 2}, build)
    print(json.dumps({"path": str(result.path), "built": result.built, "hit": result.cache_hit,
                      "waited": result.waited_for_other_builder,
                      "content": (result.path / "engine.bin").read_bytes() == b"engine" * 1000}))
""")


def test_two_processes_building_the_same_key_build_once(cache, tmp_path):
    log_path = tmp_path / "builds.log"
    start_at = time.time() + 3.0  # both processes are up (imports done) before either starts
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_BUILDER, str(cache.root), str(log_path),
                               str(start_at)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=REPO) for _ in range(2)]
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-2000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert len(log_path.read_text().split()) == 1  # exactly one build
    assert sorted(o["built"] for o in outs) == [False, True]
    loser = next(o for o in outs if not o["built"])
    assert loser["hit"] and loser["waited"]
    assert outs[0]["path"] == outs[1]["path"] and all(o["content"] for o in outs)
    assert cache.verify(Path(outs[0]["path"])).valid


# ---------------------------------------------------------------------------------- context
def make_ctx(cache_dir: Path, device: DeviceInfo) -> StackContext:
    from fluxopt.plugins import model as resolve_model

    shapes = Shapes(height=64, width=64, steps=2, guidance_scale=3.5, max_sequence_length=128)
    return StackContext(device=device, dtype=torch.float32, model=resolve_model("tiny"), shapes=shapes,
                        cache_dir=cache_dir)


def test_stack_context_artifact_records_hits_and_rebuilds(tmp_path, device):
    build = Builder()
    ctx = make_ctx(tmp_path / "c", device)
    entry = ctx.artifact("demo", {"opt": 1}, build)
    info = ctx.stats["artifacts"]["demo"]
    assert info["cache_hit"] is False and info["built"] is True and info["path"] == str(entry)
    key = json.loads((entry / MANIFEST).read_text())["key"]
    assert key["model"] == "tiny" and key["shapes"]["height"] == 64 and key["dtype"] == "torch.float32"
    assert key["backend"] == "demo" and key["opt"] == 1
    ctx = make_ctx(tmp_path / "c", device)
    assert ctx.artifact("demo", {"opt": 1}, build) == entry
    assert ctx.stats["artifacts"]["demo"]["cache_hit"] is True and build.calls == 1
    _flip_byte(entry)
    ctx.artifact("demo", {"opt": 1}, build)
    assert ctx.stats["artifacts"]["demo"]["rebuilt"] == "checksum mismatch in model.pt2" and build.calls == 2
    ctx.artifact("demo", {"opt": 2}, build)
    assert build.calls == 3


def test_lookup_only_reports_and_removes_corrupt_entries(tmp_path, device):
    ctx = make_ctx(tmp_path / "c", device)
    assert ctx.artifact("demo", {"x": 1}, None) is None
    entry = ctx.artifact("demo", {"x": 1}, Builder())
    assert ctx.artifact("demo", {"x": 1}, None) == entry
    _truncate(entry)
    assert ctx.artifact("demo", {"x": 1}, None) is None
    assert "truncated" in ctx.stats["artifacts"]["demo"]["rebuilt"] and not entry.exists()


# ---------------------------------------------------------------------------------- CLI
def _populate(cache: ArtifactCache, device: DeviceInfo) -> dict[str, Path]:
    valid = cache.get("aoti", entry_key({**KEY, "model": "tiny"}, device), Builder()).path
    corrupt = cache.get("aoti", entry_key({**KEY, "options": {"a": 3}}, device), Builder()).path
    _flip_byte(corrupt)
    stale_key = entry_key(KEY, device)
    stale_key["versions"]["torch"] = "1.0.0"
    stale = cache.get("compile", stale_key, Builder()).path
    other_gpu = cache.get("compile", entry_key(KEY, H100), Builder()).path
    return {"valid": valid, "corrupt": corrupt, "stale": stale, "other_gpu": other_gpu}


def test_cache_cli_ls(cache, device, capsys):
    paths = _populate(cache, device)
    assert cache_main(["--cache-dir", str(cache.root), "ls", "--json"]) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)["entries"]}
    assert rows[paths["valid"].name]["status"] == "valid" and rows[paths["valid"].name]["stale"] is None
    assert rows[paths["valid"].name]["kind"] == "aoti" and rows[paths["valid"].name]["size_bytes"] > 1400
    assert rows[paths["corrupt"].name]["status"] == "corrupt"
    assert "checksum mismatch" in rows[paths["corrupt"].name]["reason"]
    assert "torch" in rows[paths["stale"].name]["stale"]
    assert "another device" in rows[paths["other_gpu"].name]["stale"]
    assert cache_main(["--cache-dir", str(cache.root), "ls"]) == 0
    out = capsys.readouterr().out
    assert paths["valid"].name in out and "corrupt" in out and "tiny" in out and "4 entries" in out
    assert "H100" in out and "checksum mismatch in model.pt2" in out


def test_cache_cli_prune(cache, device, capsys):
    paths = _populate(cache, device)
    assert cache_main(["--cache-dir", str(cache.root), "prune", "--dry-run"]) == 0
    assert all(p.exists() for p in paths.values())
    assert cache_main(["--cache-dir", str(cache.root), "prune", "--keep-other-devices"]) == 0
    assert paths["valid"].exists() and paths["other_gpu"].exists()
    assert not paths["corrupt"].exists() and not paths["stale"].exists()
    assert cache_main(["--cache-dir", str(cache.root), "prune"]) == 0
    assert not paths["other_gpu"].exists() and paths["valid"].exists()
    assert cache_main(["--cache-dir", str(cache.root), "prune", "--older-than", "1"]) == 0
    assert paths["valid"].exists()
    manifest = json.loads((paths["valid"] / MANIFEST).read_text())
    manifest_created = manifest["created"]
    assert time.time() - manifest_created < 3600
    assert cache_main(["--cache-dir", str(cache.root), "prune", "--older-than", "0"]) == 0
    assert not paths["valid"].exists()
    out = capsys.readouterr().out
    assert "checksum mismatch" in out and "older than 0 days" in out


def test_cache_cli_rm(cache, device, capsys):
    paths = _populate(cache, device)
    root = ["--cache-dir", str(cache.root)]
    assert cache_main([*root, "rm", paths["valid"].name[:10]]) == 0
    assert not paths["valid"].exists() and paths["corrupt"].exists()
    assert cache_main([*root, "rm", "zzzz"]) == 1
    assert cache_main([*root, "rm"]) == 2
    assert cache_main([*root, "rm", "--all"]) == 0
    assert not any(p.exists() for p in paths.values())
    assert "removed" in capsys.readouterr().out


def test_cache_cli_as_module(cache, device):
    _populate(cache, device)
    proc = subprocess.run([sys.executable, "-m", "fluxopt.cli.cache", "--cache-dir", str(cache.root), "ls"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "4 entries" in proc.stdout
