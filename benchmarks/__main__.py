"""`python -m benchmarks` (`make bench`): raw client, naive ETA peer and ours, side by side."""

from benchmarks.side_by_side import main

raise SystemExit(main())
