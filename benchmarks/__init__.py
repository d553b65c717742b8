"""Benchmarks of bigsmall_torch (run them as scripts; nothing here is imported by the package)."""
