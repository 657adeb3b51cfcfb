"""Test set-up: keep XLA compile times short on the 2-core CPU."""

import os
import sys

import jax

# Tests check values, not speed: most XLA optimisations only cost compile time.
jax.config.update("jax_disable_most_optimizations", True)

# Make `configs` importable as in `python -m mlres_jax.main` from the repo root.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
