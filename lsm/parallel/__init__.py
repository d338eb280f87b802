"""Device mesh, logical axis names and rules, LASP-2 sequence parallelism."""
