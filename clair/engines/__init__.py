"""Engines: Ollama, the in-process chat model and SDXL, behind one protocol (engines/base.py).

An engine imports the device layer and the arbiter's types, never the service, the edge or an adapter.
"""
