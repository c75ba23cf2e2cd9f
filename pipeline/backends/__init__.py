"""Backends: host-side converters, one sub-package per runtime, looked up via pipeline.registry."""
