"""Observability: Prometheus metrics (``metrics``, ``counters``), structured logs carrying the request,
organization and job ids (``context``, ``logs``), request ids and per-route timings (``middleware``) and
optional error reporting (``errors``). README "Observability" says what is exposed and how to scrape it."""
