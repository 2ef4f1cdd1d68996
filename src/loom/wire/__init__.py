"""Wire formats: length-prefixed frames and the versioned msgpack envelope they carry.

Pure code (no asyncio, socket, os or time): the same bytes are produced and parsed by
the asyncio runtime and by sans-IO code and tests.
"""
