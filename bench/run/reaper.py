"""A reaper for the local workers and the local Ray a driver starts: when the driver dies, even by SIGKILL, the
processes it started go with it.

Ray ties its own daemons (GCS, raylet) to the driver, but the raylet's agents outlive a
killed driver. `Reaper(pids)` starts this file as a script in a session of its own
and hands it the processes (pid and start time, so that a reused pid is never killed);
the driver holds the write end of its stdin (and may hand it more, one JSON line each:
a local worker restarted after a crash). When that pipe closes — `close()`, or the
driver's death, which the kernel turns into end-of-file — the reaper terminates every
listed process still alive (SIGTERM, then SIGKILL after a grace period) and exits.
Linux only (it reads /proc); elsewhere it does nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

GRACE_SECONDS = 3.0  # between SIGTERM and SIGKILL


def descendants(pid: int | None = None) -> dict[int, int]:
    """pid -> start time (clock ticks since boot) of every live descendant of `pid`
    (default: this process); empty where there is no /proc."""
    parents: dict[int, int] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        stat = _stat(int(entry.name))
        if stat is not None:
            parents[int(entry.name)], starts[int(entry.name)] = stat
    found, todo = {}, [os.getpid() if pid is None else pid]
    while todo:
        parent = todo.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in found:
                found[child] = starts[child]
                todo.append(child)
    return found


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) from /proc/<pid>/stat; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name, in parentheses, may hold spaces
    return int(fields[1]), int(fields[19])


class Reaper:
    """Kills `processes` (pid -> start time) when this process closes it or dies."""

    def __init__(self, processes: dict[int, int]) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self.add(processes)

    def add(self, processes: dict[int, int]) -> None:
        """Hand the reaper processes (more of them: a worker started after it); the reaper
        process starts with the first (none where there is no /proc)."""
        if not processes or not Path("/proc").is_dir():
            return
        if self._process is None:
            self._process = subprocess.Popen(
                [sys.executable, __file__],  # as a script: no package import, no torch (stdlib alone)
                stdin=subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C of the driver's terminal does not reach it
            )
        pipe = self._process.stdin
        assert pipe is not None  # stdin=PIPE
        pipe.write((json.dumps(processes) + "\n").encode())
        pipe.flush()

    def close(self) -> None:
        """Reap now (what `ray.shutdown` left) and wait for the reaper to finish."""
        if self._process is not None:
            if self._process.stdin is not None:
                self._process.stdin.close()
            self._process.wait(timeout=GRACE_SECONDS + 10)
            self._process = None


def reap(processes: dict[int, int]) -> None:
    """SIGTERM each listed process still alive (same pid, same start time), SIGKILL those
    left after GRACE_SECONDS."""
    alive = _alive(processes)
    for pid in alive:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = _alive(alive)
    for pid in alive:
        _signal(pid, signal.SIGKILL)


def _alive(processes: dict[int, int]) -> dict[int, int]:
    return {pid: start for pid, start in processes.items() if (_stat(pid) or (0, -1))[1] == start}


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:  # gone meanwhile, or not ours
        pass


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    processes: dict[int, int] = {}
    for line in sys.stdin:  # until the driver closes the pipe or dies: each line lists more
        processes.update({int(pid): start for pid, start in json.loads(line).items()})
    reap(processes)


if __name__ == "__main__":
    main()
