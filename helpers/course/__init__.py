"""Instructor tools: build lessons, release student notebooks, check them, autograde."""
