"""Benchmarks of the pack: run each from the repository root as ``python -m bench.<name>`` (see bench/run_on_device.sh)."""
