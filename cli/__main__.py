"""``python -m cli ...`` is the ``genserve`` console script (torchrun relaunches it so)."""

from cli import main

raise SystemExit(main())
