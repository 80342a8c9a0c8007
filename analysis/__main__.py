"""`python -m analysis <output>/<destination_folder>`: see analysis.cli."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from analysis.cli import main as _cli_main


def main(argv: Sequence[str] | None = None) -> int:
    return _cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
