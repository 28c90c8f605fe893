"""Summaries of py-spy ``--format raw`` (collapsed stack) profiles: where the samples went.

``python -m benchmarks.profiles FILE.txt [DURATION_S]`` prints the summary of one profile.
"""

from __future__ import annotations

import collections
import json
import pathlib
import re
import sys

_LINE = re.compile(r":\d+\)$")
SAMPLE_RATE_HZ = 100


def _frame(frame: str) -> str:
    """'Extract (featurebank/server/servicer.py:150)' -> 'Extract (featurebank/server/servicer.py)', path shortened."""
    frame = _LINE.sub(")", frame.strip())
    return re.sub(r"\(.*?(site-packages|lib/python3\.\d+|/work/main)/", "(", frame)


def _file(frame: str) -> str:
    m = re.search(r"\((.*)\)$", frame)
    return m.group(1) if m else frame


def summarise(path: pathlib.Path, duration_s: float, top: int = 25) -> dict:
    """Self and inclusive sample shares per function, and self share per source file."""
    self_counts: collections.Counter = collections.Counter()
    incl_counts: collections.Counter = collections.Counter()
    file_counts: collections.Counter = collections.Counter()
    total = 0
    for line in pathlib.Path(path).read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";") if f]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        self_counts[frames[-1]] += n
        file_counts[_file(frames[-1])] += n
        for f in set(frames):
            incl_counts[f] += n

    def share(c: collections.Counter) -> list[tuple[str, float]]:
        return [(k, round(v / total, 4)) for k, v in c.most_common(top)] if total else []

    summary = {
        "samples": total,
        "duration_s": duration_s,
        # Busy threads on average (py-spy samples only threads that are running, not idle ones).
        "busy_threads": round(total / (duration_s * SAMPLE_RATE_HZ), 3) if duration_s else None,
        "top_self": share(self_counts),
        "top_inclusive": share(incl_counts),
        "self_by_file": share(file_counts),
    }
    pathlib.Path(path).with_suffix(".summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def render(summary: dict, top: int = 15) -> str:
    lines = [f"{summary['samples']} samples, {summary['busy_threads']} busy threads on average"]
    for key in ("top_self", "top_inclusive", "self_by_file"):
        lines.append(f"{key}:")
        lines += [f"  {share:6.1%}  {name}" for name, share in summary[key][:top]]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(summarise(pathlib.Path(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)))
