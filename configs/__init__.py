"""maskstream.configs: the shipped YAML files, each mirroring one config dataclass key for key.

Found through the installed package, never through the current directory or a checkout.
"""
from importlib.resources import files
from pathlib import Path

# A directory on the file system: wheels install unzipped, and callers hand these paths to
# argparse defaults and open() like any user-given path.
CONFIG_DIR = Path(str(files(__name__)))
