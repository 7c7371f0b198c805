"""A small local Azure Functions host for the Python v2 programming model (see devhost/README.md).

Core Tools cannot be installed here (its installer downloads the host), so `python -m devhost` runs the
same FunctionApp with the real host's HTTP routing, queue-trigger and timer semantics.
"""
