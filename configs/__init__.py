"""ml_collections experiment configs: `get_config(arg)` files, loaded with `--config path/to/file.py:arg`."""

__project__ = "efficient-attention"  # this project's package, not another of the same name (attention/packages.py)
