"""``python -m cabs``: the same as the ``cabs`` command."""

from cabs.cli import main

raise SystemExit(main())
