"""Tiny seeded models and their pre-training: what tests and the CPU demo run on (nothing downloads)."""
