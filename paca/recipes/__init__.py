"""Applications of the library: ``train`` (the ``paca train`` recipe), ``bench`` (``paca bench``)
and ``loading`` (models from folders). Each is a config dataclass and a ``run``.

The library (everything outside ``recipes/`` and ``cli``) never imports this package; recipes
import the public API and the integrations.
"""
