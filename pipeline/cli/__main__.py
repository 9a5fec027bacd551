"""`python -m maskstream.pipeline.cli` runs the `maskstream` command."""
import sys

from maskstream.pipeline.cli.main import main

sys.exit(main())
