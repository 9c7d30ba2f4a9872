"""Run a module under tracemalloc; SIGUSR1 writes a snapshot (bench/socket_memory.py).

    HOOMI_TRACE_OUT=/tmp/snap python -m bench.traced server.cli serve
    HOOMI_TRACE_OUT=/tmp/snap python -m bench.traced uvicorn bench.echo_app:app ...

Snapshot k goes to $HOOMI_TRACE_OUT.k; the file appears complete (written, then renamed).
"""

from __future__ import annotations

import gc
import os
import runpy
import signal
import sys
import tracemalloc
from types import FrameType

_taken = 0


def _dump(signum: int, frame: FrameType | None) -> None:
    global _taken
    _taken += 1
    out = f"{os.environ['HOOMI_TRACE_OUT']}.{_taken}"
    # What is only garbage waiting for the cycle collector is not what a socket holds.
    gc.collect()
    tracemalloc.take_snapshot().dump(out + ".part")
    os.replace(out + ".part", out)


if __name__ == "__main__":
    tracemalloc.start(int(os.environ.get("HOOMI_TRACE_FRAMES", "1")))
    signal.signal(signal.SIGUSR1, _dump)
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
