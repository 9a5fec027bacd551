"""The pipeline's stages, one module each: a config dataclass, a class with `process(msg)`
(or, for decode, `messages()`), and a three-line `main(config, wiring)` that the supervisor
starts as a process. The sockets are pipeline.runtime.stage's business, never a stage's."""
