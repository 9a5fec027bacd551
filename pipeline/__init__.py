"""maskstream.pipeline: the streaming system around the model.

Subpackages by concern: `runtime` (messages, transport, shared-memory ring, stage loop,
supervisor, metrics), `stages` (decode, preprocess, infer, postprocess, publish: one screen
each), `media` (video sources, pixels, images, drawing, output writers), `cli` (the
`maskstream` command), `bench` (the measuring library behind `maskstream bench` and
benchmarks/). `client` is the subscriber API; `results` reads what a pipeline publishes (masks,
JSON records, seq gaps) without torch; `run_config` wires a run from its config.
"""
