"""Frozen backbones and trainable modality encoders."""
