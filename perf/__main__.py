"""Entry point: ``python -m perf``."""

import sys

import perf  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
from perf.cli import main

sys.exit(main())
