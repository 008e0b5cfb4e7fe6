"""``python -m personaplex.server``: the same as ``personaplex serve``."""

import sys

from .serve import main

if __name__ == "__main__":
    sys.exit(main())
