#!/usr/bin/env bash
# The one script for the GPU machine (device tool), run from the repository root with .whl carried:
#
#   bash benchmarks/device.sh wheels            (here, not on the GPU machine)
#       download the Python 3.12 wheels its image lacks: .whl/ (fluxopt's dependencies, the cuDNN
#       frontend for fp8_attention; carried in every call), .whl-fa3/ (FlashAttention-3) and mslk
#       (torchao_int4's Hopper kernels) split into .whl-mslk-a/ and .whl-mslk-b/; each of the last
#       three travels in a call of its own (stash below). TensorRT and ModelOpt are not among them.
#   bash benchmarks/device.sh run NAME LIMIT_S [fluxopt arguments...]
#       python -m fluxopt ARGS with hydra.run.dir=/tmp/res/NAME, stopped after LIMIT_S (SIGTERM:
#       result.json stays valid, marked interrupted; the exit status is fluxopt's); NAME's result.json,
#       report.md, console output, log and failed stacks' tracebacks are copied to $OUT/NAME/. Publish
#       it here with `fluxopt-report publish`.
#   bash benchmarks/device.sh cache (export FILE | import FILE | ls ...)
#       fluxopt-cache on the machine's cache (an export written under $OUT comes back; a carried
#       export is imported on a fresh machine to show a warm build there).
#   bash benchmarks/device.sh script benchmarks/NAME.py [arguments...]
#       one of the benchmark scripts against the installed fluxopt (its output under $OUT, e.g.
#       `script benchmarks/triton_fp8_attention_bench.py $OUT/attention.json`; $OUT/script.log has what it printed).
#   bash benchmarks/device.sh tests [pytest arguments...]
#       the GPU-marked tests of the files named, else of every file ($OUT/gpu-tests.log).
#   bash benchmarks/device.sh stash DIR
#       keep DIR's wheels in /tmp/carried for the calls after this one: wheels that do not fit one
#       call's carry beside .whl travel in a call of their own (carry DIR), then install with the rest.
#       A wheel too big for one call travels as parts (split -b 24M W.whl W.whl.part-, with
#       sha256sum W.whl > W.whl.sha256), one DIR per call; the last stash joins and verifies them.
#   bash benchmarks/device.sh background WAIT_S (run ... | tests ...)
#       the same in the background (it outlives this call while the machine stays warm), waiting
#       up to WAIT_S; `bash benchmarks/device.sh poll WAIT_S` in later calls waits more and collects.
#       The run lives only as long as the machine: each poll must follow the last call within the
#       machine's idle release (30 s), or the machine goes back and the run with it (what the last
#       poll collected is what remains; a poll on such a fresh machine says so and exits 4). Keep WAIT_S
#       so that the last poll ends inside the lease, and prefer one call long enough for the whole run
#       (up to 590 s): a reply slower than 30 s loses the machine.
#
# Every call first installs the carried wheels and fluxopt itself (non-editable) into /tmp/site, once
# per machine (fluxopt again when the revision differs), and works from /tmp/work (no fluxopt/ source
# tree), so the installed package runs.
# The machine's copy of .git is not this checkout's, so the caller names the revision the tree was
# sent from, and records carry it: FLUXOPT_SOURCE_REVISION=<git rev-parse HEAD>[+dirty] bash ...
set -u
here=$PWD
setup() {
  if [ -z "${FLUXOPT_SOURCE_REVISION:-}" ]; then
    echo "FLUXOPT_SOURCE_REVISION is not set: the commit this tree was sent from (git rev-parse HEAD)" >&2
    return 1
  fi
  # the revision installed, so that a record never names a revision other than the code that ran:
  # a call from a newer tree (or any dirty one) reinstalls fluxopt itself, the wheels stay
  local installed
  installed=$(cat /tmp/site/.fluxopt-installed 2>/dev/null)
  if [ -z "$installed" ]; then
    start=$SECONDS
    python3 -m pip install -q --no-index --no-deps --no-compile --no-build-isolation --target /tmp/site \
      .whl/*.whl $(ls /tmp/carried/*.whl 2>/dev/null) . || return 1
    # which stashed wheels this install took (none: the machine that held them was given back)
    echo "setup: installed in $((SECONDS - start)) s; carried: $(cd /tmp/carried 2>/dev/null && ls *.whl 2>/dev/null | tr '\n' ' ' || true)" >&2
  elif [ "$installed" != "$FLUXOPT_SOURCE_REVISION" ] || [ "${installed%+dirty}" != "$installed" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-build-isolation --upgrade --target /tmp/site \
      . || return 1
    echo "setup: fluxopt reinstalled ($installed -> $FLUXOPT_SOURCE_REVISION)" >&2
  fi
  echo "$FLUXOPT_SOURCE_REVISION" > /tmp/site/.fluxopt-installed
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 FLUXOPT_CACHE_DIR=${FLUXOPT_CACHE_DIR:-/tmp/fluxopt-cache} \
    HF_HUB_OFFLINE=1
  mkdir -p /tmp/work /tmp/res && cp -r tests benchmarks examples docs README.md pyproject.toml /tmp/work/ && cd /tmp/work
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader
}
collect() {  # what run $1 has written so far (result.json is rewritten after every stack); only that
  # run's files, since at most 8 files come back from a call (earlier runs' came back with their calls),
  # then its failed stacks' tracebacks (logs/) and profile traces (bench.profile), gzipped, while the 8
  # and the 16 MiB a file allow
  run=/tmp/res/$1
  cp /tmp/background.log "$OUT/" 2>/dev/null
  if [ -n "$1" ] && [ -d "$run" ]; then
    mkdir -p "$OUT/$1"
    cp "$run"/result.json "$run"/report.md "$run"/fluxopt.out "$run"/*.log "$OUT/$1/" 2>/dev/null
    for log in "$run"/logs/*.log; do
      [ -f "$log" ] && [ "$(find "$OUT" -type f | wc -l)" -lt 8 ] || break
      cp "$log" "$OUT/$1/"
    done
    for trace in "$run"/profiles/*.json; do
      [ -f "$trace" ] && [ "$(find "$OUT" -type f | wc -l)" -lt 8 ] || break
      packed=$OUT/$1/$(basename "$trace").gz
      python3 -c 'import gzip, shutil, sys; shutil.copyfileobj(open(sys.argv[1], "rb"), gzip.open(sys.argv[2], "wb"))' \
        "$trace" "$packed"
      [ "$(stat -c %s "$packed")" -le 16777216 ] || rm -f "$packed"
    done
  fi
  true
}
wheels() {
  for dir in .whl .whl-fa3 .whl-mslk-a .whl-mslk-b; do
    grep -qx "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >> .git/info/exclude
    rm -rf "$dir" && mkdir -p "$dir"
  done
  local plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
              --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
              --platform manylinux2014_x86_64)
  python3 -m pip download -q --no-deps "${plat[@]}" -d .whl diffusers==0.42.1 torchao==0.18.0 hydra-core==1.3.8 \
    omegaconf==2.3.0 sageattention==1.0.6 importlib-metadata nvidia-cudnn-frontend==1.32.0 || return 1
  python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 para-attn==0.3.38 || return 1
  python3 -m pip download -q --no-deps "${plat[@]}" -d .whl-fa3 fa3-fwd==0.0.3 || return 1
  local tmp
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps "${plat[@]}" -d "$tmp" mslk-cuda==1.1.0 || return 1
  (cd "$tmp" && for w in *.whl; do sha256sum "$w" > "$w.sha256" && split -b 24M "$w" "$w.part-" && rm "$w"; done)
  mv "$tmp"/*.part-aa .whl-mslk-a/ && mv "$tmp"/*.part-* "$tmp"/*.sha256 .whl-mslk-b/ && rmdir "$tmp"
  du -sh .whl .whl-fa3 .whl-mslk-a .whl-mslk-b
}
case ${1:-} in
  wheels)
    wheels
    exit $? ;;
  run)
    name=$2 limit=$3
    shift 3
    setup || exit 1
    # --preserve-status: fluxopt's own status, 130 when it answered the SIGTERM (record marked
    # interrupted), 143 when the signal killed it unanswered, 137 when it outlived the 30 s grace
    timeout --preserve-status -s TERM -k 30 "$limit" python3 -m fluxopt "$@" "hydra.run.dir=/tmp/res/$name" 2>&1 \
      | tee "/tmp/res/$name.out"
    rc=${PIPESTATUS[0]}
    mkdir -p "/tmp/res/$name" && mv "/tmp/res/$name.out" "/tmp/res/$name/fluxopt.out"
    collect "$name"
    echo "$name: exit $rc"
    exit "$rc" ;;
  cache)
    shift
    setup > /dev/null || exit 1
    python3 -m fluxopt.cli.cache "$@"
    exit $? ;;
  script)
    shift
    setup || exit 1
    timeout 540 python3 "$@" 2>&1 | tee "$OUT/script.log"
    exit "${PIPESTATUS[0]}" ;;
  tests)
    shift
    setup || exit 1
    where=tests  # every test file, unless the arguments name files or folders (collecting all takes 30 s there)
    for arg in "$@"; do [ -e "$arg" ] && where=; done
    timeout 540 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu -rs "$@" $where 2>&1 \
      | tee "$OUT/gpu-tests.log"
    exit "${PIPESTATUS[0]}" ;;
  background)
    wait=$2
    shift 2
    mkdir -p /tmp/out
    OUT=/tmp/out setsid nohup bash "$here/benchmarks/device.sh" "$@" > /tmp/background.log 2>&1 < /dev/null &
    echo $! > /tmp/background.pid
    if [ "${1:-}" = run ]; then echo "${2:-}" > /tmp/background.name; else : > /tmp/background.name; fi
    exec bash "$here/benchmarks/device.sh" poll "$wait" ;;
  poll)
    if [ ! -f /tmp/background.pid ]; then  # a fresh machine: the one that ran it was given back
      echo "no background run on this machine: the machine that ran it was given back (idle between calls);" \
        "what the last call collected is all that remains" >&2
      exit 4
    fi
    pid=$(cat /tmp/background.pid)
    for _ in $(seq "$2"); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    cp /tmp/out/*.log "$OUT/" 2>/dev/null  # a background test run's log; a run's files come from collect
    collect "$(cat /tmp/background.name 2>/dev/null)"
    tail -5 /tmp/background.log
    if kill -0 "$pid" 2>/dev/null; then echo "still running"; exit 3; fi
    echo "finished"; exit 0 ;;
  stash)
    mkdir -p /tmp/carried && cp "$2"/* /tmp/carried/ || exit 1
    cd /tmp/carried
    for sum in *.whl.sha256; do  # a split wheel: join its parts once the checksum verifies
      [ -e "$sum" ] || continue
      wheel=${sum%.sha256}
      cat "$wheel".part-* > "$wheel" 2>/dev/null
      if sha256sum -c --quiet "$sum" 2>/dev/null; then rm -f "$wheel".part-* "$sum"; else rm -f "$wheel"; fi
    done
    ls -l /tmp/carried
    exit 0 ;;
  *)
    sed -n "2,/^set -u/p" "$0" | sed "\$d"; exit 2 ;;
esac
