"""``python -m mks2.demo [--cache-dir DIR] [--world W] [--chat-template T] [--json]``: build the demo world (if
needed) and print where everything is."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys

from mks2.config import DataConfig
from mks2.demo.builder import CHAT_TEMPLATES, DEFAULT_WORLD, ensure_built
from mks2.demo.resolve import NAMES, WORLD_ONLY, demo_path
from mks2.demo.world import WORLDS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mks2.demo", description=__doc__)
    ap.add_argument("--cache-dir", default=DataConfig().cache_dir, help="where to build (default: %(default)s)")
    ap.add_argument("--world", default=DEFAULT_WORLD, choices=WORLDS, help="which world (default: %(default)s)")
    ap.add_argument("--chat-template", default="llama2", choices=CHAT_TEMPLATES, help="of the instruction shards")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    # Libraries imported during the build may log to stdout (DeepSpeed's accelerator notice): keep
    # stdout for our output only, so --json is parseable.
    with contextlib.redirect_stdout(sys.stderr):
        root, built = ensure_built(args.cache_dir, progress=not args.quiet, world=args.world)
    names = [n for n in NAMES if WORLD_ONLY.get(n, args.world) == args.world]
    paths = {name: demo_path(root, name, chat_template=args.chat_template) for name in names}
    if args.json:
        print(json.dumps({"root": str(root), "built": built, "paths": paths}, indent=2))
    else:
        print(f"demo world {args.world!r} {'built' if built else 'already built'} at {root}")
        width = max(len(n) for n in names) + 5
        for name, path in paths.items():
            print(f"  {'demo:' + name:<{width}} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
