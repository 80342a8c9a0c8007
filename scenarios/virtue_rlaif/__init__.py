"""Virtue-ethics RLAIF (seed 004): the stage pipeline (`pipeline.py`), its CLI (`cli.py`) and the shipped prompts."""
