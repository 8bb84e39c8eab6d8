"""Place: checkpoint → builder → engine dir → runtime → serving → [bench]. Benchmarks that print numbers and write JSON.

cli.py: `nemodiff bench`. steps.py: forward latency per step shape, end to end per mode, machine
ceilings. host.py: host work per engine step. shapes.py: named model shapes with random weights.
serve.py: load on a running server. Imports: anything below it; nothing imports bench.
"""
