"""DUCK-E: the rubber duck that talks back."""

__version__ = "0.1.0"
