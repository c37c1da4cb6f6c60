"""``python -m sekisho``: the same command line as the ``sekisho`` console script."""

from sekisho.cli import main

raise SystemExit(main())
