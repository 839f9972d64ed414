"""Model servers: one pooled keep-alive client, routing over a model's upstreams, failover, timeouts."""
