"""The native schema: sandtrace's own form, exactly the object ``api.render.json_line`` dumps.

Bytes fields are escaped text there, as in every schema (api.events.bytes_text): lossless.
"""

from __future__ import annotations

from api.render import json_dict
from service.schemas.common import Doc, Item


def native(item: Item) -> Doc:
    """sandtrace's own form: the object api.render.json_line() dumps."""
    return json_dict(item)
