"""The `maskstream` command: one module per group of subcommands. The only code that prints
or exits; everything it calls raises clear exceptions instead."""


def prepare_torch() -> None:
    """Process-wide torch settings, made by each command that runs a model in this process
    (segment, build-engine, train, eval): the entry point's business, never a library's. The
    stage processes of `run` and `bench` make the same ones themselves (runtime.stage)."""
    import torch

    # float32 denormals (which untrained or badly scaled weights produce in deep activations)
    # make R50-FPN's CPU features several times slower, and flushing them changes nothing a
    # detector can see.
    torch.set_flush_denormal(True)
