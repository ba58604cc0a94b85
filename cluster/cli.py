"""The ``moecluster`` command line: one subcommand per operator task."""

from __future__ import annotations

import sys

from workers import tiny

COMMANDS = {
    "make-tiny": tiny.main,
}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        print("usage: moecluster {" + ",".join(COMMANDS) + "} ...", file=sys.stderr)
        raise SystemExit(0 if args and args[0] in ("-h", "--help") else 2)
    COMMANDS[args[0]](args[1:])


if __name__ == "__main__":
    main()
