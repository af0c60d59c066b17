"""Hybrid methods: one adapter composed of several component methods (MAM adapters, UniPELT)."""
