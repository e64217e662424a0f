"""Side-by-side benchmarks: `python -m benchmarks` (or `make bench`).

`eta_vs_schedule` runs, in one go on one machine, the naive way to schedule reminders
with Celery (`apply_async(eta=...)` on the Redis broker) and this project's way (a
durable schedule in Redis, pumped into Celery when due), and prints what each did.
"""
