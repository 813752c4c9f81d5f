"""Adapters: one client protocol each, thin. ui.py (the Gradio tabs and their API), gateway.py (the
Ollama-compatible port), openai_api.py (/v1). Each turns a request into a front-door call and its answer
into its protocol; none takes a lease or reads a card itself.
"""
