"""Virtue-ethics RLAIF (seed 004): dialogues, the AI judge, reward models, SFT and PPO with the ensemble reward.

Importing this package loads nothing heavy; `scoring` is pure numpy. See README.md in this folder.
"""
