"""`itsim demo` as a real process stopped by a real SIGTERM while it trains."""
from __future__ import annotations

import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from itsim.train import checkpoint

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _start(argv: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "itsim.cli", *argv], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _read_until(proc: subprocess.Popen, pattern: str, timeout: float = 300) -> str:
    """Output up to the first line matching `pattern` (the process keeps running)."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if re.search(pattern, line):
                return "".join(seen)
    proc.kill()
    raise AssertionError(f"no line matching {pattern!r}; output:\n{''.join(seen)[-3000:]}")


@pytest.mark.slow
def test_sigterm_during_demo_training_stops_with_one_line_exit_143_and_no_eval(tmp_path):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--images", "60", "--steps", "100000", "--workers", "1"]
    proc = _start(argv, tmp_path)
    before = _read_until(proc, r"itsim.train: train: \d+/100000 step")  # the stop flag is set up by now
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    output = before + rest
    assert proc.returncode == 143, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("itsim demo: ")]
    assert len(lines) == 1, output[-3000:]
    found = re.fullmatch(r"itsim demo: training was interrupted by SIGTERM at step (\d+) of 100000; "
                         r"checkpoint (\S+); resume with: (itsim demo .*)", lines[0])
    assert found, lines[0]
    step, ckpt, command = int(found[1]), Path(found[2]), found[3]
    assert checkpoint.verify(ckpt)["step"] == step > 0 and ckpt.parent == out / "run" / "checkpoints"
    assert "4/5 evaluate" not in output and "is not an itsim model directory" not in output
    assert not (out / "run" / "model").exists() and not (out / "run" / "eval").exists()
    assert "Traceback" not in output

    # The printed command carries on from that checkpoint (stopped again once it has resumed).
    assert shlex.split(command)[:2] == ["itsim", "demo"]
    proc = _start(shlex.split(command)[1:], tmp_path)
    before = _read_until(proc, r"itsim.train: train: \d+/100000 step")
    assert re.search(rf"resumed from \S+step_{step:07d} \(step {step}\)", before), before[-3000:]
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, rest[-3000:]
    again = re.search(r"interrupted by SIGTERM at step (\d+)", rest)
    assert again and int(again[1]) >= step
