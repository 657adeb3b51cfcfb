"""Config files for ``benchmarks/study.py``: ``--config=benchmarks/presets/NAME.py``."""
