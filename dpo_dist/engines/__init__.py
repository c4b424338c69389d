"""Thin shells around the engines: the DeepSpeed boundary, checkpoints, Ray actor pools."""
