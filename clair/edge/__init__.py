"""The web edge: host and origin checks, connection and body caps, JSON off the event loop, sessions,
users, API keys and the access log: one guard for every port (guard.py, web.py).
"""
