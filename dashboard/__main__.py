"""`python -m drywallqa.dashboard [options]`: same as `drywallqa dashboard [options]`."""

from drywallqa.dashboard.cli import main

raise SystemExit(main())
