"""Engines: the pretraining trainer built on MONAI/Ignite."""
