"""Benchmarks: `python -m benchmarks` (`make bench`) and `python -m benchmarks.fault_drill`.

`side_by_side` measures, in one run on one machine, the raw client limit, the naive way
to schedule reminders with Celery (`apply_async(eta=...)`, benchmarks/naive_app.py) and
this project's worker (driven only through `python -m worker.celery_main worker|beat`,
`reminders book` and Redis), and prints one table. `fault_drill` proves the send path
loses nothing under kills and outages. Benchmarks never import tests/.
"""
