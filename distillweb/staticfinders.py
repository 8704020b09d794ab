"""Serve plotly.js from the installed plotly package, so the browser bundle always matches the Python figures.

The machines have no internet and pages may not use a CDN; this finder exposes exactly one file,
``vendor/plotly.min.js``, to runserver, whitenoise and collectstatic.
"""

from pathlib import Path

import plotly
from django.contrib.staticfiles.finders import BaseFinder
from django.core.files.storage import FileSystemStorage

PLOTLY_JS = "plotly.min.js"
PREFIX = "vendor"


class PlotlyFinder(BaseFinder):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.storage = FileSystemStorage(location=Path(plotly.__file__).parent / "package_data")
        self.storage.prefix = PREFIX

    def check(self, **kwargs):
        return []

    def find(self, path, find_all=False, **kwargs):
        if path == f"{PREFIX}/{PLOTLY_JS}" and self.storage.exists(PLOTLY_JS):
            match = self.storage.path(PLOTLY_JS)
            return [match] if find_all or kwargs.get("all") else match
        return [] if find_all or kwargs.get("all") else None

    def list(self, ignore_patterns):
        if self.storage.exists(PLOTLY_JS):
            yield PLOTLY_JS, self.storage
