"""py-spy over a server process while a bench drives it, summarised as top costs.

    with Profile(pid, "hub-batch") as prof:   # py-spy record --format raw, in the background
        ... drive the server ...
    print(prof.report(per=messages))            # top self and inclusive costs

py-spy is a bench-only tool (`pip install py-spy`); without it, Profile does nothing and
says so. The raw output (collapsed stacks, one line per stack with its sample count) is
kept next to the summary in the directory given by $HOOMI_PROFILE_DIR (default the temp
directory) for a flame graph (`inferno-flamegraph`, `flamegraph.pl`).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from types import TracebackType

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if m is None:
        return frame
    path = m["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m['func']} ({path})"


class Profile:
    def __init__(self, pid: int, name: str, rate: int = 250) -> None:
        self.pid, self.name, self.rate = pid, name, rate
        out = Path(os.environ.get("HOOMI_PROFILE_DIR") or tempfile.gettempdir())
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / f"pyspy-{name}.txt"
        self.proc: subprocess.Popen[bytes] | None = None
        self.exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")

    def __enter__(self) -> Profile:
        if not Path(self.exe).exists():
            print(f"  (py-spy not installed: no profile for {self.name})")
            return self
        # --idle off: only samples where the thread runs (the costs), not waits.
        self.proc = subprocess.Popen(
            [self.exe, "record", "--pid", str(self.pid), "--format", "raw", "--rate",
             str(self.rate), "--nonblocking", "-o", str(self.path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def report(self, per: int = 0, top: int = 12) -> str:
        """Top functions by self samples and by inclusive samples (shares of the process's
        busy samples); with `per`, also microseconds of CPU per unit (e.g. message)."""
        if not self.path.exists():
            return f"  (no profile for {self.name})"
        own: Counter[str] = Counter()
        incl: Counter[str] = Counter()
        total = 0
        for line in self.path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = [_short(x) for x in stack.split(";")]
            total += n
            own[frames[-1]] += n
            for f in set(frames):
                incl[f] += n
        if not total:
            return f"  (empty profile for {self.name})"
        cpu_us = total / self.rate * 1e6
        head = (f"  profile {self.name}: {total} busy samples at {self.rate} Hz"
                + (f", {cpu_us / per:.0f} µs of server CPU per message" if per else "")
                + f" ({self.path})")
        lines = [head, "    self:"]
        for f, n in own.most_common(top):
            cost = f", {n / self.rate * 1e6 / per:5.1f} µs/msg" if per else ""
            lines.append(f"      {n / total:5.1%}{cost}  {f}")
        lines.append("    inclusive (our code):")
        ours = [(f, n) for f, n in incl.most_common()
                if any(k in f for k in ("server/", "storage/", "protocol/", "bench/"))]
        for f, n in ours[:top]:
            lines.append(f"      {n / total:5.1%}  {f}")
        return "\n".join(lines)
