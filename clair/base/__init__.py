"""Base: settings (the one CLAIR_* table), the error hierarchy, systemd notify, small shared helpers.

Imports nothing else of Clair.
"""
