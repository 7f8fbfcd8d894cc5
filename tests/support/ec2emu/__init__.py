"""The EC2 throttling and fault emulator (ec2_emulator.py is its command line), by concern:

| module | what |
|---|---|
| `buckets` | EC2's token buckets: a bucket's arithmetic, the request and instance buckets, which bucket a call draws on |
| `faults` | injected faults: per-pool capacity, failing pools, lost responses |
| `journal` | ClientToken idempotency: answers already given, calls in flight |
| `stats` | counters and the per-call log the control API reports |
| `fleet` | CreateFleet (instant): the pools a request names and how instances are spread over them |
| `wire` | the EC2 Query API on the wire: parameters, error bodies, CreateFleet bodies |
| `upstream` | moto: forwarding, and the lookups the emulator makes itself (subnet AZ, launch template) |
| `emulator` | the emulator's state and its handling of RunInstances, CreateFleet and other calls |
| `server` | the HTTP front: the control API under /_emulator/ and the proxy to moto |

Standard library only. The behaviour is documented in tests/support/README.md.
"""
