"""Config files for ``benchmarks/compare.py``: ``--config=benchmarks/presets/NAME.py``."""
