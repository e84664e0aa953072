"""Conversion to and from other formats (diffusers folders)."""
