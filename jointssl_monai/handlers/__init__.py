"""Ignite handlers for pretraining and fine-tuning."""

from .pretrained_encoder import PretrainedEncoderLoader as PretrainedEncoderLoader
