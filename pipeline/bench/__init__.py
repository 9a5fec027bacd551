"""Measuring: the library behind `maskstream bench` (per-stage and end-to-end throughput and
latency, plots) and the runner profile that benchmarks/ scripts and tests share."""
