"""Progress output as users see it: the CLI with stdout/stderr piped (a log file) and on a real
pseudo-terminal (`pty`)."""
from __future__ import annotations

import fcntl
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from conftest import TINY_MODEL
from itsim.progress import LogProgress, track

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def in_pty(cmd: list[str], cwd: Path, timeout: float = 300) -> tuple[int, str]:
    """Run `cmd` with stdin/stdout/stderr on a new 120x24 pseudo-terminal; (exit code, everything it wrote).
    The terminal turns each "\\n" into "\\r\\n", so a bar shows as a "\\r" that does not end a line."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal has a size
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=ENV, cwd=cwd, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal has closed it
                break
            if not data:
                break
            chunks.append(data)
        else:
            proc.kill()
            raise AssertionError(f"{cmd[3]} did not finish in {timeout} s")
    finally:
        os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")


def piped(cmd: list[str], cwd: Path) -> tuple[int, str]:
    done = subprocess.run(cmd, env=ENV, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    return done.returncode, done.stdout.decode("utf-8", "replace")


def _train(shards: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "itsim.cli", "train", "--shards", str(shards), "--out", str(out), "--steps", "6",
            "--batch-size", "8", "--workers", "0", "--log-every", "2", "--eval-every", "0", "--warmup-steps", "2",
            "--report-to", "none", *TINY_MODEL]


def test_train_in_a_log_file_writes_one_plain_line_per_log_every_steps(tiny_shards, tmp_path):
    code, out = piped(_train(tiny_shards, tmp_path / "run"), tmp_path)
    assert code == 0, out[-3000:]
    assert "\r" not in out
    lines = [line for line in out.splitlines() if re.search(r"itsim.train: train: \d+/6 step", line)]
    assert [re.search(r"train: (\d+)/6", line).group(1) for line in lines] == ["2", "4", "6"]
    for line in lines:
        assert re.search(r"loss \d\.\d{4}, acc \d\.\d{3}, img/s \d+, data wait \d+%, [\d.]+ step/s, (ETA|elapsed) ",
                         line), line


def test_train_on_a_terminal_draws_a_bar(tiny_shards, tmp_path):
    code, out = in_pty(_train(tiny_shards, tmp_path / "run"), tmp_path)
    assert code == 0, out[-3000:]
    assert re.search(r"\r(?!\n)", out) and re.search(r"train: +\d+%\|.*\| ?\d/6", out), out[-2000:]
    assert not re.search(r"train: \d+/6 step \(", out)  # no log lines instead of the bar


def _synth(out: Path) -> list[str]:
    return [sys.executable, "-m", "itsim.cli", "synth", str(out), "--images", "120", "--workers", "1"]


def _shards(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "itsim.cli", "build-shards", "--captions", str(data / "results.csv"), "--images",
            str(data / "images"), "--out", str(out), "--image-size", "32", "--shard-size", "30", "--workers", "1"]


@pytest.mark.parametrize("command", ["synth", "build-shards"])
def test_synth_and_build_shards_log_tenths_in_a_log_file_and_draw_a_bar_on_a_terminal(synth_data, tmp_path,
                                                                                      command):
    make = (lambda out: _synth(out)) if command == "synth" else (lambda out: _shards(synth_data, out))
    code, out = piped(make(tmp_path / "piped"), tmp_path)
    assert code == 0, out[-3000:]
    assert "\r" not in out
    counts = [int(m.group(1)) for m in re.finditer(rf"{command}: (\d+)/(\d+) img \(", out)]
    total = 120 if command == "synth" else 300
    assert counts and counts[-1] == total and counts == sorted(counts)
    if command == "build-shards":  # one image per update: a line at each tenth
        assert counts == [total * k // 10 for k in range(1, 11)]

    code, out = in_pty(make(tmp_path / "tty"), tmp_path)
    assert code == 0, out[-3000:]
    assert re.search(r"\r(?!\n)", out) and re.search(rf"{command}: +\d+%\|", out), out[-2000:]
    assert not re.search(rf"{command}: \d+/\d+ img \(", out)


def test_log_progress_writes_every_n_updates_on_new_numbers_and_at_close(caplog):
    logger = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        bar = LogProgress(25, "job", "img", logger, every=10, seconds=0)
        for _ in range(25):
            bar.update(1)
        bar.set_postfix(loss="0.5")
        bar.update(0)
        bar.close()
        bar.close()  # closed once: no second last line
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(",")[0] for line in lines] == ["job: 10/25 img (40%)", "job: 20/25 img (80%)",
                                                     "job: 25/25 img (100%)"]
    assert "loss 0.5" in lines[-1] and "ETA" in lines[0] and "elapsed" in lines[-1]


def test_track_without_a_total_counts_items(caplog, capsys):  # capsys: stderr is not a terminal even with -s
    with caplog.at_level(logging.INFO, logger="test.track"):
        assert list(track(iter(range(7)), "encode", "img", logger=logging.getLogger("test.track"))) == list(range(7))
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["encode: 7 img"]
