"""Shared pieces of the steering apps: bluesky-adaptive-shaped agents, a small GP surrogate, the
pool session (start a pool, reuse or fit an adapter part), evaluation and outputs."""
