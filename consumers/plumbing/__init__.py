"""What the consumers' runnable parts (commands, events, bridge, reconciler: the modules beside
this package) are built from: the part protocol and its scope, Kafka and dead-letter helpers,
Prefect calls, lanes, clean-up jobs, the orphan sweep, options and metrics."""
