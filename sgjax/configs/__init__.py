"""The shipped config files, one `get_config()` each, found by name from any directory.

`--config=fashion_mnist`, `--config=fashion_mnist.py` and `--config=configs/fashion_mnist.py`
all name sgjax/configs/fashion_mnist.py unless that path exists where the command runs (a user's
own config file always wins): `sgjax.config.resolve`, which lists them (`shipped_names`).
"""
