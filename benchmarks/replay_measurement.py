"""What a shorter measurement would have saved on a recorded run: each stack's timed calls replayed
in order through the stopping rule the measurement uses (``bench.target_rse``,
fluxopt.measure.precise_enough), and its warm-up cut to ``--warmup`` calls, so that the bench's
settings can be chosen from records instead of from a lease. A warm-up call after the first is
counted at the stack's median latency (the first call is recorded on its own).

    python benchmarks/replay_measurement.py docs/results/<run>/result.json [--target 0.005] [--warmup 1]
"""

from __future__ import annotations

import argparse

from fluxopt.measure import bounded_calls, precise_enough
from fluxopt.record import StackRecord, read_record


def warmup_calls(stack: StackRecord, warmup: int, max_time_s: float | None) -> int:
    """The warm-up calls ``stack`` made (or would make) with ``warmup`` asked for, by the rule the
    measurement applies (fluxopt.measure.bounded_calls), on a clock that advances by the recorded
    first call and then by the stack's median latency."""
    durations = [stack.first_call_s or 0.0] + [stack.latency.median] * warmup
    elapsed, made = [0.0], 0
    for i in bounded_calls(warmup, 1, max_time_s, clock=lambda: elapsed[0]):
        elapsed[0] += durations[i]
        made += 1
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("record")
    parser.add_argument("--target", type=float, default=0.005, help="relative standard error (bench.target_rse)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls (bench.warmup; default: the record's)")
    args = parser.parse_args()
    record = read_record(args.record)
    if record is None:
        parser.error(f"{args.record}: no such record")
    bench = record.config.get("bench") or {}
    warmup = bench.get("warmup", 0) if args.warmup is None else args.warmup
    timed_s = warmup_s = 0.0
    stopped = fewer_warmups = steady_first = 0
    for stack in [record.baseline, *record.stacks]:
        if stack is None or stack.latency is None:
            continue
        samples = stack.latency.samples
        kept = next((n for n in range(1, len(samples) + 1) if precise_enough(samples[:n], args.target)), len(samples))
        timed_s += sum(samples[kept:])
        stopped += kept < len(samples)
        made = warmup_calls(stack, bench.get("warmup", 0), bench.get("max_time_s"))
        cut = max(0, made - warmup_calls(stack, warmup, bench.get("max_time_s")))
        warmup_s += cut * stack.latency.median
        fewer_warmups += cut
        steady_first += stack.first_call_s is not None and abs(stack.first_call_s / stack.latency.median - 1) <= 0.03
        print(f"{stack.stack:28s} {len(samples)} timed calls -> {kept}; {made} warm-up call(s) -> {made - cut}")
    print(f"{stopped} stack(s) stop early, saving {timed_s / 60:.1f} minutes of timed calls; "
          f"{fewer_warmups} warm-up call(s) fewer, saving {warmup_s / 60:.1f} minutes (builds and loads unchanged); "
          f"{steady_first} first call(s) within 3 % of their stack's median")


if __name__ == "__main__":
    main()
