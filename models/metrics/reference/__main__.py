"""``python -m models.metrics.reference --data DIR --out DIR ...`` (see :mod:`models.metrics.reference.cli`)."""

from models.metrics.reference.cli import main

main()
