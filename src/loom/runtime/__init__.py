"""The only asyncio code: thin drivers that move bytes between sockets and the pure cores."""
