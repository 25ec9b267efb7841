"""The tensorstore_pt benchmark harness: ``tspt bench`` / ``python -m benchmarks``.

See docs/benchmarks.md for the method, the systems and the latest results.
"""

from .runner import BenchConfig, BenchError, run_benchmark

__all__ = ["BenchConfig", "BenchError", "run_benchmark"]
