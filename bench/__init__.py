"""Benchmark of registry-proxy against nginx (distribution's recipe) and the bare registry."""
