"""`itsim` command line: a thin layer that hands each subcommand to the module that does the work.

Each module listed here defines `add_cli(subparsers)`, which adds its parser and sets `func`.
Only the chosen subcommand's module is imported, so `itsim synth` does not pay for importing Ray.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from itsim.errors import Interrupted, UserError

COMMANDS = {
    "synth": "itsim.data.synth",
    "build-shards": "itsim.data.shards",
    "train": "itsim.train",
    "eval": "itsim.eval",
    "score": "itsim.score.ray_job",
    "export": "itsim.model.export",
    "demo": "itsim.demo",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="itsim", description="Image-caption matching: shards, training, scoring.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, module in COMMANDS.items():
        if wanted in COMMANDS and name != wanted:
            sub.add_parser(name, help=f"(see itsim {name} --help)")
            continue
        importlib.import_module(module).add_cli(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"itsim {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"itsim {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"itsim {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
