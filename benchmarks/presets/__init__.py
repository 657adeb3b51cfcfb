"""Config files for ``benchmarks/compare.py`` (``--preset=NAME`` loads ``NAME.py``)."""
