"""genserve's own pages, served by the boundary from files in the package.

``/`` is the model page (``static/index.html``: cards from ``GET /models``, sampling plots,
scoring), ``/docs`` the API reference (``static/docs.html``: BentoML's bundled Swagger UI
drawing ``/docs.json``), and ``/page/NAME`` their scripts, styles and icon. Nothing on them
comes from another host: each answer carries a ``Content-Security-Policy`` whose
``default-src 'self'`` lets the browser load and connect to this origin only (the reference
also shows Swagger's ``data:`` icons). ``/page/config.json`` tells the page the limits it
must respect (rows per request, samples, steps, body bytes) and whether the verbs ask for a
token. The files are read once, when the worker serves its first page.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from artifact import genserve_version
from service.settings import Settings

__all__ = ["DOCS_CSP", "PAGE_CSP", "PAGE_MAX_ROWS", "STATIC", "Asset", "Pages"]

STATIC = Path(__file__).with_name("static")
PAGE_CSP = "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
DOCS_CSP = ("default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'none'")
PAGE_MAX_ROWS = 100_000
"""Rows the page scores from one file (in requests of at most ``GENSERVE_MAX_ROWS``): the
browser holds them all; ``genserve score`` is the tool for bigger files."""
PREFIX = "/page/"
_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml",
          ".json": "application/json"}
_ROUTES = {"/": "index.html", "/docs": "docs.html"}


@dataclass(frozen=True)
class Asset:
    """One answer: the bytes, their content type and the policy they are served under."""

    body: bytes
    content_type: str
    csp: str

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"content-type", self.content_type.encode()),
                (b"content-security-policy", self.csp.encode()),
                (b"x-content-type-options", b"nosniff"),
                (b"referrer-policy", b"no-referrer"),
                (b"cache-control", b"no-cache")]


class Pages:
    """The pages and their files by path; ``auth``: whether the verbs ask for a token."""

    def __init__(self, settings: Settings, auth: bool, directory: Path = STATIC) -> None:
        self.assets: dict[str, Asset] = {}
        for file in sorted(directory.iterdir()):
            if file.suffix in _TYPES:
                csp = DOCS_CSP if file.name.startswith("docs") else PAGE_CSP
                self.assets[PREFIX + file.name] = Asset(file.read_bytes(), _TYPES[file.suffix],
                                                        csp)
        for route, name in _ROUTES.items():
            self.assets[route] = self.assets[PREFIX + name]
        config = {"version": genserve_version(), "auth": auth,
                  "max_rows": settings.max_rows, "max_samples": settings.max_samples,
                  "max_steps": settings.max_steps, "max_body_bytes": settings.max_body_bytes,
                  "page_max_rows": PAGE_MAX_ROWS}
        self.assets[PREFIX + "config.json"] = Asset(json.dumps(config).encode(),
                                                    _TYPES[".json"], PAGE_CSP)

    @staticmethod
    def serves(path: str) -> bool:
        """Whether ``path`` is the pages' to answer (a missing ``/page/`` file is a 404)."""
        return path in _ROUTES or path.startswith(PREFIX)

    def find(self, path: str) -> Asset | None:
        return self.assets.get(path)
