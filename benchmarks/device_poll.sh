#!/usr/bin/env bash
# Wait up to WAIT_S for the background measurement (device_background.sh), then copy what it
# has written so far to $OUT. Exit 0 when it has finished, 3 while it still runs.
set -u
wait=$1
pid=$(cat /tmp/background.pid)
for _ in $(seq "$wait"); do
  kill -0 "$pid" 2>/dev/null || break
  sleep 1
done
cp -r /tmp/out/. "$OUT/"
# result.json is rewritten after every stack: a run cut short (the machine is taken back after
# 30 minutes held) still returns the stacks it finished
for run in /tmp/res/*_run; do
  [ -f "$run/result.json" ] && cp "$run/result.json" "$OUT/$(basename "$run").partial.json"
done
tail -5 /tmp/out/background.log
if kill -0 "$pid" 2>/dev/null; then echo "still running"; exit 3; fi
echo "finished"; exit 0
