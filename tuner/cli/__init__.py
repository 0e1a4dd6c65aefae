"""Command line: `tuner train|check|sample|grid|export|merge|bench|eval|toy ...`, one module
per command group.

User mistakes (TunerError) print one line and exit 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from importlib.metadata import entry_points

from tuner.errors import TunerError

COMMAND_GROUPS = (
    "tuner.cli.train",
    "tuner.cli.sample",
    "tuner.cli.grid",
    "tuner.cli.export",
    "tuner.cli.bench",
    "tuner.cli.plan",
)


def _quiet_libraries() -> None:
    # Library chatter (deprecations, "kernels not installed") buries the lines users need.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers", "accelerate", "bitsandbytes", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuner", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    for module in COMMAND_GROUPS:
        importlib.import_module(module).register(sub)
    # Command groups of installed plugins (the toy world's `eval` and `toy`).
    for point in entry_points(group="tuner.commands"):
        point.load()(sub)
    return parser


PEER_LOST = 3


def peer_lost(exc: BaseException) -> bool:
    """A collective failed because another process is gone (gloo/NCCL/TCPStore errors)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("gloo", "Gloo", "NCCL", "Connection closed by peer", "Broken pipe")
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if not debug:
        _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TunerError as exc:
        if debug:
            raise
        rank = int(os.environ.get("RANK", "0") or 0)
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        elif type(exc).__name__ != "Stopped":  # every rank stops alike; rank 0 says it once
            print(f"error: rank {rank}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") in ("", "0"):
            print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # A process of a multi-process run whose peer died: the launcher names the rank that
        # died and the last checkpoint, so this one exits quietly (3) instead of a traceback.
        if not debug and os.environ.get("TUNER_LAUNCHER") and peer_lost(exc):
            return PEER_LOST
        raise


if __name__ == "__main__":
    raise SystemExit(main())
