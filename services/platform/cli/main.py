"""`tandem`: the command line. Each command group lives in its own module and registers itself here.

Errors a user can fix are printed as `tandem: error: ...` on stderr with exit status 1; bad usage is
argparse's exit status 2. Logs go to stderr; stdout carries only a command's result.
"""

from __future__ import annotations

import argparse
import logging
import sys

from services.platform.cli import chat as chat_cmd
from services.platform.cli import generate as generate_cmd
from services.platform.cli import keys as keys_cmd
from services.platform.cli import models as models_cmd
from services.platform.cli import platform as platform_cmd
from services.platform.cli import serve as serve_cmd
from services.platform.cli import train as train_cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Serve and train large language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    models_cmd.register(sub)
    generate_cmd.register(sub)
    chat_cmd.register(sub)
    serve_cmd.register(sub)
    platform_cmd.register(sub)
    train_cmd.register(sub)
    keys_cmd.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except (*models_cmd.USER_ERRORS, ValueError) as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
