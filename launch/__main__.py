"""``python -m launch env|submit|status|cancel``: see :mod:`launch.cli` and docs/launch.md."""

from launch.cli import main

raise SystemExit(main())
