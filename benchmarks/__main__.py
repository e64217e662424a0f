"""`python -m benchmarks`: the ETA-versus-schedule comparison (see eta_vs_schedule)."""

from benchmarks.eta_vs_schedule import main

raise SystemExit(main())
