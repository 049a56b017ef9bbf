"""`python -m drywallqa.edge run ...` == `drywallqa edge run ...` (works without the top-level CLI)."""

import sys

from drywallqa.edge.cli import main

if __name__ == "__main__":
    sys.exit(main(["edge", *sys.argv[1:]]))
