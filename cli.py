"""`python cli.py ...` is the same CLI as the `retort` console script."""

import sys

from retort.cli import main

if __name__ == "__main__":
    sys.exit(main())
