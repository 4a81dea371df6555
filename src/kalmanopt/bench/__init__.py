"""Benchmarks: tasks that measure the optimizers. They know the optimizers only through their public API."""
