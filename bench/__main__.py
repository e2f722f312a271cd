"""`python -m bench` (from the repository root); bench/run is the usual way in."""

from bench.driver import main

raise SystemExit(main())
