#!/usr/bin/env python
"""Django's command-line utility for OpenTinker."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    if sys.argv[1:2] == ["opentinker"]:
        # Starting the embedded servers cannot wait for settings that need those servers' URLs.
        from devstack.embedded import main as embedded_main

        sys.exit(embedded_main(sys.argv[2:]))
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
