"""The device layer: what a GPU says about memory (CUDA or a simulated card), pinned weight swaps,
the allocator's settings.

Knows no model and no request; imports only clair.base.
"""
