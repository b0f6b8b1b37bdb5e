"""Benchmarks users run against a ragmix server (`ragmix bench ...`)."""
