"""Prompt-based methods: prompt tuning, prefix tuning, P-tuning (engine: :mod:`peftkit.engine.prompting`)."""
