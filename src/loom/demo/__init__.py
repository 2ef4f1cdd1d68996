"""`loom demo threads`: the Threads launch, replayed on an embedded cluster."""
