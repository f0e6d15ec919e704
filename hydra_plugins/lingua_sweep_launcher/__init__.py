"""lingua_sweep's Hydra plugins (hydra_plugins/ itself is a namespace package)."""
