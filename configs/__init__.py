"""maskstream.configs: the shipped YAML files, each mirroring one config dataclass key for key.

Found through the installed package, never through the current directory or a checkout.
"""
from importlib.resources import files
from pathlib import Path

__all__ = ["CONFIG_DIR", "find_config", "shipped_configs"]

# A directory on the file system: wheels install unzipped, and callers hand these paths to
# argparse defaults and open() like any user-given path.
CONFIG_DIR = Path(str(files(__name__)))


def shipped_configs() -> list[str]:
    """The shipped YAML files, relative to CONFIG_DIR: `model_lite.yaml`, `train/synthetic_lite.yaml`, ..."""
    return sorted(str(path.relative_to(CONFIG_DIR)) for path in CONFIG_DIR.rglob("*.yaml"))


def find_config(name: str | Path) -> Path:
    """A config file named on the command line: the path itself where it exists, else the shipped
    file it names, as the documentation spells them (`configs/train/synthetic_lite.yaml`) or
    shorter (`train/synthetic_lite.yaml`, `synthetic_lite`), so that those commands work from any
    folder of an installed package, not only from a checkout. FileNotFoundError otherwise, listing
    the shipped ones."""
    path = Path(name)
    if path.exists():
        return path
    inner = Path(*path.parts[1:]) if len(path.parts) > 1 and path.parts[0] == "configs" else path
    if not path.is_absolute() and ".." not in inner.parts:
        named = inner if inner.suffix else inner.with_suffix(".yaml")
        for candidate in (named, Path("train") / named) if len(named.parts) == 1 else (named,):
            if (CONFIG_DIR / candidate).is_file():
                return CONFIG_DIR / candidate
    raise FileNotFoundError(f"{name}: no such file, nor a shipped config of that name "
                            f"(shipped, in {CONFIG_DIR}: {', '.join(shipped_configs())})")
