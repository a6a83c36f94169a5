"""The end-to-end demo on the digital knee phantom (``ctsma demo``)."""

from .run import DemoSettings, run_demo

__all__ = ["DemoSettings", "run_demo"]
