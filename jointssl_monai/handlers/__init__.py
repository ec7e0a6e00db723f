"""Ignite handlers for pretraining and fine-tuning."""
