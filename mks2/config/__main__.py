"""``python -m mks2.config --reference [--output docs/CONFIG.md]``: print or write the config reference."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mks2.config.reference import config_reference
from mks2.fileio import atomic_write_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mks2.config", description=__doc__)
    parser.add_argument("--reference", action="store_true", help="the Markdown reference of every config key")
    parser.add_argument("--output", type=Path, default=None, help="write it to this file instead of stdout")
    args = parser.parse_args(argv)
    if not args.reference:
        parser.error("nothing to do: pass --reference")
    text = config_reference()
    if args.output is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(args.output, text)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
