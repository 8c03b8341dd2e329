"""The development stack: the embedded PostgreSQL and Valkey (`embedded`), and `make demo` (`demo`, with the
example jobs it submits in `recipes`), supervising those servers, the web server and a Celery worker as
processes on this machine.

It runs before Django is configured (the settings need the servers' URLs it writes), so it imports no
Django and nothing of the platform: only the SDK, to submit the examples as a user would. Nothing in the
platform imports it (an import-linter contract in pyproject.toml); `manage.py opentinker up|down|status`,
the tests' services plugin and the benchmarks do.
"""
