"""``python -m certorch ...``: the same command line as the ``certorch`` script."""
from __future__ import annotations

import sys

from certorch.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
