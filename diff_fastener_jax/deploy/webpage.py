"""The inspection page of the HTTP service: GET / in a browser to check images without a terminal.

Pick or drop images, choose the category of a multi-category model, and see each image's verdict, its
score against the threshold and the heat-map overlay, with a table of the results so far (CSV built in
the browser). Plain HTML, JavaScript and CSS shipped in the package (deploy/static/): no CDN, no
framework, nothing loaded from another host, so the page works on an inspection machine without
internet. It calls the service's own /metadata and /predict.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

STATIC_PACKAGE = "diff_fastener_jax.deploy"
STATIC_FOLDER = "static"
ASSET_PREFIX = "/inspection/"  # app.js and style.css; index.html refers to them relative to /

# file name -> media type of every file the page consists of
PAGE_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

# The browser enforces "this service only": scripts and styles from these files, images from the
# service, data: URLs (the heat maps) and blob: URLs (previews of the picked files).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # an upgraded package serves its new page at once
}


def read_page_file(name: str) -> bytes:
    """The bytes of one of PAGE_FILES, from the installed package."""
    return resources.files(STATIC_PACKAGE).joinpath(STATIC_FOLDER, name).read_bytes()


def add_inspection_page(api: FastAPI) -> None:
    """Adds GET / (the page) and GET /inspection/app.js, /inspection/style.css to `api`; the files are
    read once, here."""
    contents = {name: read_page_file(name) for name in PAGE_FILES}

    def serve(name: str):
        def page_file():
            return Response(contents[name], media_type=PAGE_FILES[name], headers=PAGE_HEADERS)

        return page_file

    api.get("/", include_in_schema=False)(serve("index.html"))
    for name in PAGE_FILES:
        if name != "index.html":
            api.get(ASSET_PREFIX + name, include_in_schema=False)(serve(name))
