"""Training configs: `default` (the paper's ResNet-50-i on CIFAR-10) and its variants.

Each module's ``get_config()`` returns an ``ml_collections.ConfigDict``; pass
the file to ``python -m mlres_jax.main --config=configs/NAME.py``.
"""
