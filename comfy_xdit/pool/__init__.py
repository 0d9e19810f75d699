"""Controller <-> worker-pool transport: typed JSON over a Unix socket, tensors via shared memory."""
