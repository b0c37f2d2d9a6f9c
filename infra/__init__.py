"""Infrastructure: what the operations stand on.

Settings, the PostgreSQL pool and the error table, the wire format, batching
and the heartbeat writer, events, the JetStream intent stream, and the retry
and outage helpers. Nothing here imports the operations (subjects/) or the
process (daemon/).
"""
