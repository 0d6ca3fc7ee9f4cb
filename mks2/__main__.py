"""``python -m mks2 COMMAND ...``: the ``mks2`` console script (mks2/cli.py)."""

import sys

from mks2.cli import main

if __name__ == "__main__":
    sys.exit(main())
