"""DeepEarth xcube server plugin: the DeepEarth API beside xcube's own."""

from .safety import hide_tracebacks

hide_tracebacks()
