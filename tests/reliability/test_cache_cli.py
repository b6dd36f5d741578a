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
