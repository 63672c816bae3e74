"""Thin entry point: ``python server.py [MODEL] [flags]`` is ``lrsa serve [MODEL] [flags]``."""

import sys

from lrsa_serve.serving.cli import main

if __name__ == "__main__":
    sys.exit(main())
