"""`python -m scenarios.virtue_rlaif`: see scenarios/virtue_rlaif/cli.py."""

import sys

from scenarios.virtue_rlaif.cli import main

sys.exit(main())
