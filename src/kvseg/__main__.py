"""``python -m kvseg`` (and ``torchrun -m kvseg train ...``) runs the CLI."""

from kvseg.cli import main

raise SystemExit(main())
