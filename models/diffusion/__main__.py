"""``python -m models.diffusion --data DIR --out DIR``: train and export a generator (see training.main)."""

from models.diffusion.training import main

main()
