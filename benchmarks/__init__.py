"""Benchmarks of bigsmall_torch, run from the root of a source checkout as
``python -m benchmarks.<name>`` (``python -m benchmarks`` lists them). Not part of the installed
package; nothing here is imported by it."""
