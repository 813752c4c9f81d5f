"""The front door (service): every request's limits, caps, lease, cancel, ownership and progress, for
every client alike (studio.py, front.py), plus what it reports (panel, metrics) and keeps (conversations).

Imports engines, the arbiter and the device layer; never the edge or an adapter.
"""
