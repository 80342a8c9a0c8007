"""Anchor-compatible entry point: python main.py --destination_folder 1xUT_1xaUT_1xDE --num_iterations 30000 --num_runs 20"""

import sys

from scenarios.cli import main

if __name__ == "__main__":
    sys.exit(main())
