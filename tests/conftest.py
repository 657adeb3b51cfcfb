"""Test set-up: keep XLA compile times short on the 2-core CPU."""

import os
import tempfile

import jax

# Tests check values, not speed: most XLA optimisations only cost compile time.
jax.config.update("jax_disable_most_optimizations", True)

# Many tests compile the same train step (same depth, same shapes): a
# compilation cache for this test session, shared with the training
# processes the tests start, compiles each program once.
_CACHE_DIR = tempfile.mkdtemp(prefix="mlres_jax_test_xla_cache_")
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
