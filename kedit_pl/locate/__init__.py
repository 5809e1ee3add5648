"""Locating knowledge: causal tracing, knowledge neurons and training-data influence."""
