"""ml_collections experiment configs: `get_config(arg)` files, loaded with `--config path/to/file.py:arg`."""
