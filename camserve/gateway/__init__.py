"""camserve's own gRPC API: servicer, batcher (queue, deadlines, back-pressure),
backends, server and commands."""
