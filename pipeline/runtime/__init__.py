"""The stage runtime: typed messages and their wire codec, ZeroMQ transport, the shared-memory
ring for pixels, the loop every stage runs, the supervisor that starts and watches the
stages, per-stream reordering and metrics. Only `transport` imports zmq."""
