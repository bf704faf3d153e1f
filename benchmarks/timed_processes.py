"""Timing a training or generation process from a small parent, for the benchmarks that run limner beside an
upstream script: wall time and peak memory (the child's max RSS), with other jobs on the machine stopped for the
length of each timed run when asked (`--pause PATTERN`).

    from timed_processes import PAUSER, run
    PAUSER.pattern = args.pause
    record = run(cmd, log, env)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]  # the commands run from the repository root


class Pauser:
    """SIGSTOP the processes matching a pattern for the length of a timed run, SIGCONT them after it (always)."""

    def __init__(self, pattern: str | None):
        self.pattern, self.seconds, self.pids = pattern, 0.0, []

    def __enter__(self):
        if self.pattern:
            found = subprocess.run(["pgrep", "-f", self.pattern], capture_output=True, text=True).stdout.split()
            mine = ancestors()  # this process and those that started it may name the pattern in their arguments
            self.pids = [int(p) for p in found if int(p) not in mine]
            for pid in self.pids:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if self.pids:
            self.seconds += time.perf_counter() - self.t0
        self.pids = []


PAUSER = Pauser(None)  # the benchmark sets PAUSER.pattern from its --pause


def ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def run(cmd: list[str], log: Path, env: dict, timed: bool = True) -> dict:
    """Wall seconds and peak RSS (MiB) of one process; its output goes to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        with PAUSER if timed else nullcontext():
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            except BaseException:  # interrupted: the child goes too
                proc.kill()
                proc.wait()
                raise
            wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{Path(cmd[1]).name if len(cmd) > 1 else cmd[0]} failed (exit {code}); see {log}")
    return {"seconds": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "small_parent": True}


def measure_once(results: dict, path: Path, key: str, fn: Callable[[], Any]) -> Any:
    """results[key], measured by fn() only where missing and then saved to `path` at once, so an interrupted
    benchmark resumes with what it had measured."""
    if key not in results:
        results[key] = fn()
        path.write_text(json.dumps(results, indent=1))
        print(key, results[key], f"(paused others {PAUSER.seconds:.0f} s so far)", flush=True)
    return results[key]


def write_results(out: Path, lines: list[str], summary: dict) -> None:
    """results.md from `lines`, and `summary` added to results.json (written by the runs), then the page printed."""
    (out / "results.md").write_text("\n".join(lines) + "\n")
    path = out / "results.json"
    if path.exists():
        data = json.loads(path.read_text())
        data["summary"] = summary
        path.write_text(json.dumps(data, indent=1))
    print((out / "results.md").read_text())
