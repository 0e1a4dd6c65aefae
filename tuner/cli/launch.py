"""`python -m tuner.cli.launch N RECIPE [overrides]`: N training processes on this machine
(what ./launch.sh --num-processes N runs), without torchrun's elastic agent.

- SIGINT/SIGTERM to this launcher reach every worker once (the workers run in their own
  session, so a terminal's Ctrl+C is not delivered twice); each worker saves a checkpoint and
  rank 0 prints the one "stopped" line.
- A worker that dies (killed, crashed) ends the run within seconds: the others are stopped
  and one line names the rank and the last complete checkpoint.

It imports neither torch nor tuner's training code: it only starts and watches processes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PEER_LOST = 3  # tuner.cli.PEER_LOST: a worker that only saw another one die
GRACE_S = 20.0  # how long workers get to finish after the first one ended in error


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env(rank: int, world: int, port: int) -> dict:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        GROUP_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TUNER_LAUNCHER="1",
    )
    return env


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def last_checkpoint(recipe_args: list[str]) -> tuple[str, str]:
    """(the last complete checkpoint or 'none saved yet', the resume command)."""
    from tuner.recipe import load_recipe

    try:
        recipe = load_recipe(recipe_args[0], recipe_args[1:])
    except Exception:  # the workers already said what is wrong with it
        return "unknown", "train.resume=latest"
    root = Path(recipe.output.dir) / "checkpoints"
    found = sorted(
        (p for p in root.glob("step-*") if (p / "tuner_state.json").is_file()),
        key=lambda p: p.name,
    )
    where = f"the last complete checkpoint is {found[-1]}" if found else "no checkpoint saved yet"
    return where, recipe.command("train.resume=latest")


def launch(world: int, args: list[str]) -> int:
    port = free_port()
    cmd = [sys.executable, "-m", "tuner", "train", *args]
    procs = [
        subprocess.Popen(cmd, env=worker_env(rank, world, port), start_new_session=True)
        for rank in range(world)
    ]

    def forward(signum, frame) -> None:
        # A closed terminal (SIGHUP) stops the run like `kill`: a checkpoint, then the line.
        sent = signal.SIGTERM if signum == signal.SIGHUP else signum
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(sent)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)

    first_error: tuple[int, int] | None = None  # (rank, code) of the first failure
    died: tuple[int, int] | None = None  # the first worker that ended without a tuner line
    deadline = None
    while True:
        codes = [proc.poll() for proc in procs]
        for rank, code in enumerate(codes):
            if code in (None, 0):
                continue
            if first_error is None:
                first_error, deadline = (rank, code), time.monotonic() + GRACE_S
            if died is None and code not in (2, 130, PEER_LOST):
                died = (rank, code)
                # The others can do nothing without it: they end at their next collective
                # (PEER_LOST); a short grace for that, then they are killed.
                deadline = min(deadline, time.monotonic() + 5.0)
        if all(code is not None for code in codes):
            break
        if deadline is not None and time.monotonic() > deadline:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
            for proc in procs:
                proc.wait()
            break
        time.sleep(0.1)
    codes = [proc.returncode for proc in procs]
    if all(code == 0 for code in codes):
        return 0
    if died is not None:
        rank, code = died
        where, resume = last_checkpoint(args)
        print(
            f"error: process rank {rank} of {world} died ({describe_exit(code)}); the run "
            f"stopped; {where}; resume with: {resume}",
            file=sys.stderr,
        )
        return 2
    if any(code == 130 for code in codes):
        return 130
    return 2  # a tuner line was printed by the workers


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or not argv[0].isdigit() or int(argv[0]) < 1:
        print("usage: python -m tuner.cli.launch N RECIPE [key=value ...]", file=sys.stderr)
        return 2
    return launch(int(argv[0]), argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
