"""What `ps`, `top`, `htop` and `pgrep -f` show of the processes a run or a node starts.

A process started by multiprocessing's spawn has the command line `python -c "from
multiprocessing.spawn import spawn_main; ..."`: forty of them on a node say nothing of which camera
or stage each one is. setproctitle replaces the command line (`ps -f`, `htop`, `pgrep -f`) and
/proc/self/comm takes the short name (`ps -o comm`, `top`, `pgrep`; Linux keeps 15 characters).
"""

from __future__ import annotations

import setproctitle

__all__ = ["name_process"]

PREFIX = "maskstream: "


def name_process(title: str, short: str | None = None) -> None:
    """Show this process as `maskstream: <title>`, and `short` (default: the title) as its comm name."""
    setproctitle.setproctitle(PREFIX + title)
    try:  # after setproctitle, which sets the comm name to its title's start
        with open("/proc/self/comm", "w") as comm:
            comm.write((short or title)[:15])
    except OSError:  # not Linux, or /proc not mounted: the command line is set all the same
        pass
