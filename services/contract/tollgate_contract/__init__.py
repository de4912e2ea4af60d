"""The contract between the operator and the gateway, defined once and imported by both.

- `config`: the configuration document the operator writes and the gateway reads, and the
  key under which the config Secret holds it;
- `env`: the environment variables the operator sets on the gateway container;
- `keys`: how a key becomes a hash and a fingerprint;
- `usage`: the usage table the gateway writes and the one read the operator makes of it.

Nothing here imports either side: a change to the contract is a change to this package,
and both sides see it at once.
"""
