"""Fault injection: SIGKILL at random moments across a checkpointed FedSmoothLoRA run, each kill followed by a
resume, must end bit-identical to the uninterrupted run, with no temporary file or folder left behind.

Checkpoint writes are slowed down (``--slow_save``) so that random kills land inside them often, and every third
kill waits for a checkpoint's temporary folder to appear, so some kill always hits a write.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fed_setup import assert_states_close

KILLS = 12
ROUNDS = 4


class _ForkServer:
    """``fed_setup.py --serve``: each run is a forked child (a real process), without re-importing torch."""

    def __init__(self) -> None:
        script = Path(__file__).with_name("fed_setup.py")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen([sys.executable, str(script), "--serve"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
        assert self._read() == "ready"

    def _read(self) -> str:
        line = self.process.stdout.readline()
        assert line, "the fork server died"
        return line.strip()

    def start(self, *argv: str) -> int:
        self.process.stdin.write(json.dumps(list(argv)) + "\n")
        self.process.stdin.flush()
        return int(self._read())

    def wait(self, pid: int) -> int:
        self.process.stdin.write(f"wait {pid}\n")
        self.process.stdin.flush()
        return int(self._read())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def _leftovers(folder: Path) -> list[str]:
    """Hidden (temporary) entries of a run folder and its checkpoints/."""
    names = []
    for where in (folder, folder / "checkpoints"):
        try:
            names += os.listdir(where)
        except FileNotFoundError:
            pass
    return sorted(n for n in names if n.startswith("."))


@pytest.mark.slow
def test_random_sigkills_then_resumes_end_bit_identical(tmp_path):
    rng = random.Random(20240611)
    started = time.perf_counter()
    server = _ForkServer()
    try:
        run = ["fedsmoothlora", "--num_rounds", str(ROUNDS), "--save_every", "1", "--slow_save", "0.03"]
        tic = time.perf_counter()
        assert server.wait(server.start(run[0], str(tmp_path / "full"), *run[1:])) == 0
        full_seconds = time.perf_counter() - tic
        reference = torch.load(tmp_path / "full" / "final_state.pt")

        kills, hit_a_write, episodes, delays = 0, 0, 0, []
        while kills < KILLS:  # an episode ends when a child finishes before its kill; then a fresh folder
            out = tmp_path / f"killed-{episodes}"
            resume: list[str] = []
            while kills < KILLS:
                pid = server.start(run[0], str(out), *run[1:], *resume)
                resume = ["--resume"]
                if len(delays) % 3 == 2:  # into a checkpoint write: once its temporary folder exists
                    deadline = time.perf_counter() + 2 * full_seconds
                    while time.perf_counter() < deadline and not any(
                        n.startswith(".tmp-round") for n in _leftovers(out)
                    ):
                        time.sleep(0.002)
                    delay = rng.uniform(0.0, 0.05)
                else:
                    delay = rng.uniform(0.2, 0.8 * full_seconds)
                delays.append(delay)
                time.sleep(delay)
                with_leftover = False
                try:
                    os.kill(pid, signal.SIGKILL)
                    with_leftover = bool(out.is_dir() and _leftovers(out))
                except ProcessLookupError:
                    pass
                status = server.wait(pid)
                if status == 0:
                    break  # finished before the kill
                assert status == -signal.SIGKILL, (Path(f"{out}.log").read_text()[-3000:])
                kills += 1
                hit_a_write += with_leftover
            if status != 0:
                assert server.wait(server.start(run[0], str(out), *run[1:], "--resume")) == 0, (
                    Path(f"{out}.log").read_text()[-3000:]
                )
            assert_states_close(torch.load(out / "final_state.pt"), reference)  # bit for bit
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
            assert _leftovers(out) == [], "a temporary file or folder was left behind"
            assert [p.name for p in sorted((out / "checkpoints").iterdir())] == [f"round-{i:06d}" for i in range(1, ROUNDS + 1)]
            episodes += 1
    finally:
        server.close()
    seconds = time.perf_counter() - started
    print(f"{kills} kills ({hit_a_write} left a temporary file behind), {episodes} episode(s), "
          f"uninterrupted run {full_seconds:.1f} s, delays {min(delays):.2f}-{max(delays):.2f} s, total {seconds:.0f} s")  # fmt: skip
    assert kills >= 10 and seconds < 240
