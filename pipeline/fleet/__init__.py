"""Fleet mode: many hosts share cameras, jobs and results through a NATS JetStream cluster.

Frames never leave their host (ZeroMQ stays the data path inside one); NATS carries control and
results:

- `config`: FleetConfig, the servers, credentials, TLS, and JetStream names and limits;
- `connection`: FleetClient, one NATS connection per process on a loop thread, with blocking calls;
- `leases`: cameras as fleet state in a KV bucket, claimed by nodes through leases with a TTL;
- `jobs`: offline jobs on a work-queue stream, redelivered when a node dies, their states in a KV bucket;
- `results`: Detections / EndOfStream on a subject per stream, kept in a stream for replay;
- `records`: the strict msgpack encoding of the control records.

docs/fleet.md describes the whole; docs/schema.md the results' payload.
"""
