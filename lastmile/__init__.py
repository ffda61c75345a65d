"""Lastmile: the clinic device gateway application."""

__version__ = "0.1.0"
