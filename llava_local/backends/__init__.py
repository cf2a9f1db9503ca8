"""Engines behind :class:`~llava_local.VisionChat`."""
