"""Benchmarks of our trainers and rollout against TRL and `generate` (`make bench`, see README.md)."""
