"""The package version, in a module of its own so that any layer can read it
(``pipec/__init__.py`` names every phase lazily and sits at the top)."""

__version__ = "0.1.0"
