"""Integrations with training engines. Each module imports its engine lazily."""
