"""A py-spy raw profile (`py-spy record -f raw`, with --gil: only the thread
holding the GIL is sampled) of a tidal server under load, summed by thread
role (the event loop, request threads, the engine's thread, ...) and, within
the roles, by the innermost frames.

    py-spy record --gil -r 200 -f raw -o gil.txt -- python benchmarks/front_end.py
    python3 benchmarks/pyspy_summary.py gil.txt [--rate 200] [--top 12]
"""

from __future__ import annotations

import argparse
from collections import Counter

# (role, a frame name that marks it), first match wins
ROLES = (
    ("event loop (HTTP, JSON, routes)", ("Server.run", "asyncio_run")),
    ("request threads (validation, images)", ("WorkerThread.run",)),
    ("engine thread", ("EngineLoop._run",)),
    ("API client threads (benchmark)", ("_closed_loop.<locals>.client",)),
    ("thread pools (hashing)", ("_worker",)),
    ("benchmark set-up (JPEG encoding)", ("_jpeg_urls",)),
    ("start-up (imports, model load)", ("_find_and_load", "from_pretrained")),
)


def role(names: list[str]) -> str:
    for label, marks in ROLES:
        if any(m in names for m in marks):
            return label
    return "other"


def summarize(path: str, rate: float, top: int) -> str:
    by_role: Counter[str] = Counter()
    leaves: dict[str, Counter[str]] = {}
    for line in open(path):
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack:
            continue
        names = [f.split(" (")[0] for f in stack.split(";")]
        r = role(names)
        by_role[r] += int(count)
        leaves.setdefault(r, Counter())[" <- ".join(reversed(names[-3:]))] += int(count)
    total = sum(by_role.values())
    out = [f"{total} samples at {rate:g} Hz ({total / rate:.2f} s)", "", "| role | samples | s | share |", "| --- | --- | --- | --- |"]
    out += [f"| {r} | {n} | {n / rate:.2f} | {n / total:.0%} |" for r, n in by_role.most_common()]
    for r, _ in by_role.most_common():
        out += ["", f"{r}: innermost frames", ""]
        out += [f"  {n:6d}  {leaf}" for leaf, n in leaves[r].most_common(top)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile")
    ap.add_argument("--rate", type=float, default=200, help="py-spy's sampling rate (-r)")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    print(summarize(args.profile, args.rate, args.top))


if __name__ == "__main__":
    main()
