"""Whose requests a cap counts, on the APIs: a key's user, one person behind a client trusted to say who, or
an address.

A client that speaks for several people (Open WebUI: every one of its users arrives with its one key, or from
its one address) would otherwise be one person for CLAIR_MAX_JOBS_PER_USER, and a household using it at once
would be told "Busy". Open WebUI can name the person with each request (`ENABLE_FORWARD_USER_INFO_HEADERS=true`
sends `X-OpenWebUI-User-Id`, `-Name`, `-Email`, `-Role`: Open WebUI's docs, "Environment Variable
Configuration", https://docs.openwebui.com/getting-started/env-configuration). Anyone can send such a header,
so it counts only from the keys (or, without users, the client addresses) listed in
CLAIR_FORWARDED_USERS_FROM; from anyone else it is ignored. A trusted client's people each get the per-person
cap; the house cap (CLAIR_MAX_QUEUE) still holds them all.

The person's id is a client's string: it is only hashed into the counter's key, never logged, stored or sent
back. The busy message says whose requests were counted in Clair's own words.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

from clair.base.helpers import client_key

PERSON_HEADER = "x-openwebui-user-id"
_PERSON = re.compile(r"[\x21-\x7e]{1,256}")  # printable ASCII, no spaces: Open WebUI's ids are UUIDs


def trusted_sources(cfg) -> set[str]:
    return {s.strip() for s in cfg.forwarded_users_from.split(",") if s.strip()}


def counted_as(cfg, user: str | None, address: str, headers: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(the cap counter's key, whose requests it counts in words). `user` is the key's user (None without
    users), `address` the client's address as the server saw it."""
    source = f"the key of {user}" if user else f"{address}"
    # Without a key, a person is an address, and an IPv6 /64 one LAN host (clair/base/helpers.py), so a client
    # cannot be several people by picking addresses in its range. (Loopback addresses stay apart: this machine's
    # programs are trusted, as Ollama trusts them; tests play several clients with them.)
    base = f"user:{user}" if user else f"address:{client_key(address)}"
    if headers is not None and (user or address) in trusted_sources(cfg):
        person = headers.get(PERSON_HEADER) or ""
        if _PERSON.fullmatch(person):
            digest = hashlib.sha256(person.encode("ascii")).hexdigest()[:24]
            return f"{base}/person:{digest}", (
                f"the requests of the one person (Open WebUI's X-OpenWebUI-User-Id) behind {source}"
            )
        return base, (
            f"every request from {source} without a person named (X-OpenWebUI-User-Id; Open WebUI sends it with "
            "ENABLE_FORWARD_USER_INFO_HEADERS=true)"
        )
    return base, (
        f"every request from {source}, all of its people together (a client that speaks for several people, such "
        "as Open WebUI, can have them counted apart: CLAIR_FORWARDED_USERS_FROM, docs/clients.md)"
    )


def busy_note(message: str, counted: str) -> str:
    """The per-person refusal with whose requests it counted (the house-wide one is everybody's)."""
    if "CLAIR_MAX_JOBS_PER_USER" not in message:
        return message
    return f"{message} Counted: {counted}."
