"""Fakes of the outside world (IMDS, API server, scheduler) for tests, benchmarks and simulation."""
