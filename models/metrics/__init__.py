"""Generator quality metrics in a chest-X-ray feature space (filled in below)."""
