"""Integrations with optional libraries, imported lazily: see :mod:`mita.integrations.hf`."""
