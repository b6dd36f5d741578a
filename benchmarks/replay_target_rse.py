"""What ``bench.target_rse`` would have saved on a recorded run: each stack's timed calls replayed in
order through the same stopping rule the measurement uses (fluxopt.measure.precise_enough), so a
precision target can be chosen from records instead of from a lease.

    python benchmarks/replay_target_rse.py docs/results/<run>/result.json [--target 0.005]
"""

from __future__ import annotations

import argparse

from fluxopt.measure import precise_enough
from fluxopt.record import read_record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("record")
    parser.add_argument("--target", type=float, default=0.005, help="relative standard error (bench.target_rse)")
    args = parser.parse_args()
    record = read_record(args.record)
    if record is None:
        parser.error(f"{args.record}: no such record")
    saved_s, stopped = 0.0, 0
    for stack in [record.baseline, *record.stacks]:
        if stack is None or stack.latency is None:
            continue
        samples = stack.latency.samples
        kept = next((n for n in range(1, len(samples) + 1) if precise_enough(samples[:n], args.target)), len(samples))
        saved_s += sum(samples[kept:])
        stopped += kept < len(samples)
        print(f"{stack.stack:28s} {len(samples)} timed calls -> {kept}")
    print(f"{stopped} stack(s) stop early, saving {saved_s / 60:.1f} minutes of timed calls "
          f"(builds, warm-ups and loads unchanged)")


if __name__ == "__main__":
    main()
