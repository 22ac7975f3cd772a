"""Benchmark commands, one module per lab: ``python -m kdcourse bench labN``.

Each prints the figures the lab's issue asks for (ratios measured in one run,
timings as medians of repeats), never asserting a speed in a test.
"""
