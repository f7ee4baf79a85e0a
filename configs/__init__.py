"""Training recipes: each file defines `get_config()`. Installed as `jax_iclemb.configs`, so that
`--config NAME` finds them by name (`jax_iclemb.config.resolve_config_path`)."""
