"""`drywallqa bench`: not implemented yet (see the export task report)."""

from __future__ import annotations

import argparse


def main_from_args(args: argparse.Namespace) -> int:
    raise SystemExit("error: `drywallqa bench` is not implemented yet (tracked in issue 5); "
                     "use `drywallqa export` and the backends directly for now")
