"""`python -m sandtrace`: the same as the `sandtrace` command."""

import sys

from sandtrace.cli import main

sys.exit(main())
