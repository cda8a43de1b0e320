"""The device engine: each device's models (loaded lazily, shared by its streams, unloaded when idle),
its worker thread, and the scheduler that batches the work of every stream and file job on it."""
