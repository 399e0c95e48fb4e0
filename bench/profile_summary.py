#!/usr/bin/env python3
"""Summarize py-spy "raw" (collapsed stack) files written by `bench_registry.py --profile DIR`.

For each file: the functions with the most samples on top of the stack (self) and anywhere on
it (inclusive), line numbers folded, paths shortened. Samples in EpollSelector.select are the
daemon waiting for work.

    .venv/bin/python bench/profile_summary.py /tmp/prof/*.txt [--top 15]
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

_NOISE = ("runpy", "asyncio/runners.py", "machined/__main__.py", "run_until_complete",
          "run_forever")


def shorten(frame: str) -> str:
    frame = re.sub(r"\S*/site-packages/", "", frame)
    frame = re.sub(r"\S*/machined/", "machined/", frame)
    frame = re.sub(r"\S*/lib/python3\.\d+/", "", frame)
    return re.sub(r":\d+\)$", ")", frame)


def summarize(path: str, top: int) -> None:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = [shorten(fr) for fr in stack.split(";")]
            own[frames[-1]] += n
            for fr in set(frames):
                inclusive[fr] += n
    print(f"== {path}: {total} samples")
    if not total:
        return
    print("  self:")
    for fr, n in own.most_common(top):
        print(f"    {100 * n / total:5.1f}%  {fr}")
    print("  inclusive:")
    shown = 0
    for fr, n in inclusive.most_common():
        if any(x in fr for x in _NOISE):
            continue
        print(f"    {100 * n / total:5.1f}%  {fr}")
        shown += 1
        if shown >= top:
            break


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    for path in args.files:
        summarize(path, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
