"""``fluxopt-cache``: list, remove and prune the artifact cache.

    fluxopt-cache ls [--json]                 entries: id, kind, size, age, status, what they are for
    fluxopt-cache rm ID_PREFIX... | --all     remove entries (an id prefix must match one entry)
    fluxopt-cache prune [--older-than DAYS] [--dry-run] [--keep-other-devices]
                                              remove corrupt/incomplete entries, entries for other
                                              package versions, runtimes or GPUs, and old entries
    fluxopt-cache export FILE [--kind KIND]...  every verified entry usable here, as one archive
    fluxopt-cache import FILE                 verify an export's entries and add them (warm builds
                                              on a fresh machine of the same GPU and versions)

The cache directory is ``--cache-dir``, else ``$FLUXOPT_CACHE_DIR``, else ``~/.cache/fluxopt``.
Also ``python -m fluxopt.cli.cache``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from fluxopt.artifacts import (
    ARTIFACTS,
    INDUCTOR,
    ArtifactCache,
    EntryInfo,
    default_cache_dir,
    environment_key,
)
from fluxopt.errors import OneLineParser
from fluxopt.files import private_dir, write_atomic


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def human_age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def _detect_device():
    from fluxopt.environment import detect_device

    return detect_device("auto")


def cmd_ls(cache: ArtifactCache, args: argparse.Namespace) -> int:
    entries = list(cache.entries())
    device = _detect_device() if entries else None
    now = time.time()
    rows = []
    for e in entries:
        stale = e.stale_for(device) if e.status == "valid" else None
        rows.append({"id": e.id, "kind": e.kind, "size_bytes": e.size_bytes, "age_s": round(now - e.mtime, 1),
                     "status": "building" if e.building and e.status != "valid" else e.status,
                     "reason": e.reason, "stale": stale, "summary": e.summary, "path": str(e.path)})
    if args.json:
        print(json.dumps({"cache_dir": str(cache.root), "entries": rows}, indent=2))
        return 0
    print(f"cache: {cache.root}")
    if not rows:
        print("(empty)")
        return 0
    print(f"{'ID':<26} {'KIND':<10} {'SIZE':>10} {'AGE':>5}  {'STATUS':<10} KEY")
    for r in rows:
        status = r["status"] + ("*" if r["stale"] else "")
        print(f"{r['id'][:26]:<26} {r['kind'][:10]:<10} {human_size(r['size_bytes']):>10} "
              f"{human_age(r['age_s']):>5}  {status:<10} {r['summary']}")
        if r["reason"] and r["status"] != "valid":
            print(f"{'':<26} ^ {r['reason']}")
    total = sum(r["size_bytes"] for r in rows)
    print(f"{len(rows)} entries, {human_size(total)}")
    if any(r["stale"] for r in rows):
        print("* built for another GPU, runtime or package versions (removed by 'fluxopt-cache prune')")
    return 0


def cmd_rm(cache: ArtifactCache, args: argparse.Namespace) -> int:
    entries = list(cache.entries())
    if args.all:
        chosen = entries
    else:
        if not args.ids:
            print("fluxopt-cache rm: give entry ids (prefixes) or --all", file=sys.stderr)
            return 2
        chosen = []
        for prefix in args.ids:
            matches = [e for e in entries if e.id.startswith(prefix)]
            if not matches:
                print(f"fluxopt-cache rm: no entry id starts with '{prefix}'", file=sys.stderr)
                return 1
            if len(matches) > 1:
                ids = ", ".join(f"{m.kind}/{m.id}" for m in matches)
                print(f"fluxopt-cache rm: '{prefix}' is ambiguous ({ids}); give a longer prefix", file=sys.stderr)
                return 1
            chosen.extend(matches)
    for e in chosen:
        if e.building and e.status != "valid":
            print(f"skipped {e.kind}/{e.id}: being built by another process")
            continue
        cache.remove(e.path)
        print(f"removed {e.kind}/{e.id} ({human_size(e.size_bytes)})")
    return 0


def prune_reason(e: EntryInfo, device, older_than_days: float | None, keep_other_devices: bool) -> str | None:
    if e.status != "valid":
        return None if e.building else f"{e.status}: {e.reason}"
    if older_than_days is not None and time.time() - e.mtime > older_than_days * 86400:
        return f"older than {older_than_days:g} days"
    stale = e.stale_for(device)
    if stale and not (keep_other_devices and stale.startswith("built for another device")):
        return stale
    return None


def cmd_prune(cache: ArtifactCache, args: argparse.Namespace) -> int:
    entries = list(cache.entries())
    device = _detect_device() if entries else None
    freed = removed = 0
    for e in entries:
        reason = prune_reason(e, device, args.older_than, args.keep_other_devices)
        if reason is None:
            continue
        if not args.dry_run:
            cache.remove(e.path)
        removed += 1
        freed += e.size_bytes
        print(f"{'would remove' if args.dry_run else 'removed'} {e.kind}/{e.id} ({human_size(e.size_bytes)}): {reason}")
    print(f"{'would free' if args.dry_run else 'freed'} {human_size(freed)} in {removed} entries")
    return 0


# --------------------------------------------------------------------------- export / import
EXPORT_MANIFEST = "fluxopt-cache-export.json"
EXPORT_FORMAT = 1


def _exportable(cache: ArtifactCache, kinds: Sequence[str], device) -> tuple[list[EntryInfo], list[str]]:
    """Valid entries usable on this machine (of ``kinds`` when given), and why others are left out."""
    chosen, left = [], []
    for e in cache.entries():
        if e.kind == INDUCTOR or (kinds and e.kind not in kinds):
            continue
        if e.status != "valid":
            left.append(f"{e.kind}/{e.id}: {e.status} ({e.reason})")
            continue
        stale = e.stale_for(device)
        if stale:
            left.append(f"{e.kind}/{e.id}: {stale}")
            continue
        chosen.append(e)
    return chosen, left


def cmd_export(cache: ArtifactCache, args: argparse.Namespace) -> int:
    """One archive of every verified entry this machine can use (compiled graphs' portable caches,
    calibrations, packages, engines), with the environment it was built in, written atomically."""
    device = _detect_device()
    if args.file.exists():
        print(f"fluxopt-cache export: {args.file} exists; an export never overwrites a file, choose a new name",
              file=sys.stderr)
        return 2
    entries, left = _exportable(cache, args.kind, device)
    if not entries:
        print(f"fluxopt-cache export: no valid entry to export in {cache.root}"
              + (f" of kind {', '.join(args.kind)}" if args.kind else ""), file=sys.stderr)
        return 1
    manifest = {"format": EXPORT_FORMAT, "environment": environment_key(device),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "entries": [{"kind": e.kind, "id": e.id, "summary": e.summary, "size_bytes": e.size_bytes}
                            for e in entries]}

    def write(handle) -> None:
        with tarfile.open(fileobj=handle, mode="w:gz", compresslevel=1) as tar:
            data = json.dumps(manifest, indent=2, default=str).encode()
            info = tarfile.TarInfo(EXPORT_MANIFEST)
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, io.BytesIO(data))
            for e in entries:
                tar.add(e.path, arcname=f"{ARTIFACTS}/{e.kind}/{e.id}")

    write_atomic(args.file, write)
    for why in left:
        print(f"not exported: {why}")
    total = sum(e.size_bytes for e in entries)
    print(f"exported {len(entries)} entries ({human_size(total)}) to {args.file} "
          f"({human_size(args.file.stat().st_size)}); on another machine: fluxopt-cache import {args.file.name}")
    return 0


def cmd_import(cache: ArtifactCache, args: argparse.Namespace) -> int:
    """Unpack an export into a private staging directory inside the cache, verify every entry
    (manifest, key, checksums, and that it was built for this GPU and these package versions), and
    move each valid one into place; nothing unverified ever lands where a build would load it."""
    device = _detect_device()
    if not args.file.is_file():
        print(f"fluxopt-cache import: {args.file}: no such file", file=sys.stderr)
        return 2
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=private_dir(cache.root)))
    try:
        try:
            with tarfile.open(args.file, mode="r:*") as tar:
                names = tar.getnames()
                if EXPORT_MANIFEST not in names:
                    print(f"fluxopt-cache import: {args.file} is not a fluxopt-cache export (no {EXPORT_MANIFEST})",
                          file=sys.stderr)
                    return 2
                tar.extractall(staging, filter="data")
        except (tarfile.TarError, OSError, EOFError) as exc:
            print(f"fluxopt-cache import: {args.file} cannot be read: {exc}", file=sys.stderr)
            return 2
        manifest = json.loads((staging / EXPORT_MANIFEST).read_text())
        if manifest.get("format") != EXPORT_FORMAT:
            print(f"fluxopt-cache import: {args.file} has export format {manifest.get('format')!r}; this "
                  f"fluxopt reads {EXPORT_FORMAT}", file=sys.stderr)
            return 2
        staged = ArtifactCache(staging)
        imported = present = rejected = 0
        for e in staged.entries():
            stale = e.stale_for(device) if e.status == "valid" else None
            if e.status != "valid" or stale:
                print(f"rejected {e.kind}/{e.id}: {stale or f'{e.status} ({e.reason})'}")
                rejected += 1
                continue
            target = private_dir(private_dir(cache.artifacts_dir) / e.kind) / e.id
            if cache.verify(target).valid:
                present += 1
                continue
            if target.exists():
                cache.remove(target)
            os.replace(e.path, target)
            if not cache.verify(target).valid:  # moved across a boundary it should not have: never keep it
                cache.remove(target)
                print(f"rejected {e.kind}/{e.id}: did not verify after the move")
                rejected += 1
                continue
            imported += 1
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"imported {imported} entries into {cache.root} ({present} already there, {rejected} rejected)")
    return 1 if rejected else 0


def _days(text: str) -> float:
    """``--older-than``: a finite number of days >= 0 (a negative or infinite age would remove everything)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"--older-than={text} is not allowed: a finite number of days >= 0")
    return value


def _cache(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ArtifactCache:
    """The cache to work on: it must exist and be a directory (a typo must not read as "(empty)")."""
    root = args.cache_dir.expanduser() if args.cache_dir else default_cache_dir()
    setting = "--cache-dir" if args.cache_dir else "the cache directory ($FLUXOPT_CACHE_DIR or ~/.cache/fluxopt)"
    if not root.exists():
        parser.exit(2, f"fluxopt-cache: error: {setting}={root} does not exist\n")
    if not root.is_dir():
        parser.exit(2, f"fluxopt-cache: error: {setting}={root} is not a directory\n")
    return ArtifactCache(root)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fluxopt-cache", description="Inspect and clean fluxopt's artifact cache.")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="cache directory (default: $FLUXOPT_CACHE_DIR or ~/.cache/fluxopt)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    ls = sub.add_parser("ls", help="list entries")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    rm = sub.add_parser("rm", help="remove entries by id prefix, or all")
    rm.add_argument("ids", nargs="*", help="entry id prefixes (see 'ls')")
    rm.add_argument("--all", action="store_true", help="remove every entry")
    prune = sub.add_parser("prune", help="remove corrupt, incomplete, stale and old entries")
    prune.add_argument("--older-than", type=_days, default=None, metavar="DAYS",
                       help="also remove entries created more than DAYS days ago")
    prune.add_argument("--keep-other-devices", action="store_true",
                       help="keep entries built for other GPUs/CPUs (a cache shared by several machines)")
    prune.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    export = sub.add_parser("export", help="write every verified entry usable here into one archive")
    export.add_argument("file", type=Path, help="the archive to write (.tar.gz); must not exist")
    export.add_argument("--kind", action="append", default=[], help="only entries of this kind (repeatable)")
    imp = sub.add_parser("import", help="verify an export's entries and add them to the cache")
    imp.add_argument("file", type=Path, help="an archive written by 'fluxopt-cache export'")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "import":  # an import may fill a cache directory that does not exist yet
        root = args.cache_dir.expanduser() if args.cache_dir else default_cache_dir()
        if root.exists() and not root.is_dir():
            parser.exit(2, f"fluxopt-cache: error: the cache directory {root} is not a directory\n")
        return cmd_import(ArtifactCache(private_dir(root)), args)
    cache = _cache(parser, args)
    return {"ls": cmd_ls, "rm": cmd_rm, "prune": cmd_prune, "export": cmd_export}[args.command](cache, args)


if __name__ == "__main__":
    sys.exit(main())
