"""One event or alert as a JSON-serialisable dict, in the schema a SIEM output asks for.

    SCHEMAS["ecs"](event)  # a Schema: Item -> Doc

native (service/schemas/native.py)
    sandtrace's own form: exactly the object ``api.render.json_line`` dumps.
ecs (service/schemas/ecs.py)
    Elastic Common Schema.
ocsf (service/schemas/ocsf.py)
    OCSF 1.8.0.

Each schema module dispatches on the item's type through a table (type -> function), and
ecs and ocsf put the fields all events share together before those of the event's kind.
service/schemas/common.py has what they share.

In ecs and ocsf every string a traced process controls (argv, paths, comm) is decoded from
bytes with ``errors="backslashreplace"``: valid UTF-8 stays text, each invalid byte becomes
the four characters ``\\xNN``, so a SIEM that insists on valid Unicode accepts every
document. Control characters stay as they are: JSON escapes them when the dict is dumped.
"""

from __future__ import annotations

from service.schemas import ecs, native, ocsf
from service.schemas.common import Schema

SCHEMAS: dict[str, Schema] = {"native": native.native, "ecs": ecs.ecs, "ocsf": ocsf.ocsf}
