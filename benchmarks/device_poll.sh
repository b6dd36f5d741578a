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
tail -5 /tmp/out/background.log
if kill -0 "$pid" 2>/dev/null; then echo "still running"; exit 3; fi
echo "finished"; exit 0
