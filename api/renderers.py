"""The API's JSON renderer: DRF's JSONRenderer, encoded by orjson.

Rendering a page of jobs with the standard library's encoder was a tenth of a list request's CPU; orjson
writes the same bytes several times faster. The output is DRF's: compact separators, UTF-8 (not ASCII
escapes), datetimes as DRF's encoder writes them (``...Z`` for UTC), U+2028/U+2029 escaped. Anything orjson
refuses (an integer beyond 64 bits, a string with a lone surrogate, a type neither orjson nor DRF's encoder
knows) goes through DRF's renderer unchanged, as does a request for indented output (``Accept:
application/json; indent=4``). One difference: a NaN or infinite float becomes ``null`` instead of a 500.
"""

from __future__ import annotations

import orjson
from rest_framework import renderers
from rest_framework.utils.encoders import JSONEncoder

# Datetimes and dataclasses go to DRF's encoder, so they are written exactly as before.
_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_NON_STR_KEYS
_default = JSONEncoder().default
_LS, _PS = "\u2028".encode(), "\u2029".encode()


class JSONRenderer(renderers.JSONRenderer):
    def render(self, data, accepted_media_type=None, renderer_context=None):
        if (
            data is None
            or self.ensure_ascii
            or not self.compact
            or self.get_indent(accepted_media_type, renderer_context or {}) is not None
        ):
            return super().render(data, accepted_media_type, renderer_context)
        try:
            out = orjson.dumps(data, default=_default, option=_OPTIONS)
        except orjson.JSONEncodeError:
            return super().render(data, accepted_media_type, renderer_context)
        if _LS in out or _PS in out:  # a strict subset of JavaScript, as DRF writes it
            out = out.replace(_LS, b"\\u2028").replace(_PS, b"\\u2029")
        return out
