"""Background jobs: the queue in the store, worker processes, liveness and cancellation."""
