#!/usr/bin/env bash
# Start a measurement script on the GPU machine in the background (it outlives the device call)
# and wait for it; later calls of `benchmarks/device_poll.sh` wait more and collect its outputs.
#   bash benchmarks/device_background.sh SCRIPT WAIT_S [ARGS...]   (first call, .whl carried)
#   bash benchmarks/device_poll.sh WAIT_S                   (back-to-back later calls)
# The script writes under /tmp/out (OUT is set to it); each call copies /tmp/out to its own $OUT.
set -u
script=$1 wait=$2
shift 2
mkdir -p /tmp/out
OUT=/tmp/out setsid nohup bash "$script" "$@" > /tmp/out/background.log 2>&1 < /dev/null &
echo $! > /tmp/background.pid
exec bash benchmarks/device_poll.sh "$wait"
