"""Measure the product: engine benchmarks, the side-by-side report, the load sweep and the demo."""
