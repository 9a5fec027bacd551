"""The `maskstream` command: one module per group of subcommands. The only code that prints
or exits; everything it calls raises clear exceptions instead."""
