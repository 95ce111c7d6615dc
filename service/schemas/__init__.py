"""One event or alert as a JSON-serialisable dict, in the schema a SIEM output asks for.

    SCHEMAS["ecs"](event)  # a Schema: Item -> Doc

native (service/schemas/native.py)
    sandtrace's own form: exactly the object ``api.render.json_line`` dumps.
ecs (service/schemas/ecs.py)
    Elastic Common Schema 9.4.0.
ocsf (service/schemas/ocsf.py)
    OCSF 1.8.0.

Each schema module dispatches on the item's type through a table (type -> function), and
ecs and ocsf put the fields all events share together before those of the event's kind.
service/schemas/common.py has what they share.

In every schema each string a traced process controls (argv, paths, comm) is "escaped text"
(api.events.bytes_text): valid UTF-8 as itself, a backslash doubled, each invalid byte as
``\\xNN``; lossless (api.events.text_bytes gives the bytes back) and valid Unicode, so a
SIEM that insists on valid Unicode accepts every document. Control characters stay as they
are: JSON escapes them when the dict is dumped.
"""

from __future__ import annotations

from service.schemas import ecs, native, ocsf
from service.schemas.common import Schema

SCHEMAS: dict[str, Schema] = {"native": native.native, "ecs": ecs.ecs, "ocsf": ocsf.ocsf}
