"""The tooling above the servers: the `zeroserve` command (cli.py), `zeroserve up`, the chaos
suite, the benchmarks (bench/) and the operations tools (ops/: supervise, scale, status,
autoscale, models check).

It stands above broker/, workers/ and gateway/: it starts them as processes and imports them
to measure them, and nothing below imports it (tests/test_layers.py checks the import graph).
"""
