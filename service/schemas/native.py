"""The native schema: sandtrace's own form, exactly the object ``api.render.json_line`` dumps.

Bytes fields are lossless there (invalid UTF-8 as lone surrogates \\udcNN).
"""

from __future__ import annotations

from api.render import json_dict
from service.schemas.common import Doc, Item


def native(item: Item) -> Doc:
    """sandtrace's own form: the object api.render.json_line() dumps."""
    return json_dict(item)
