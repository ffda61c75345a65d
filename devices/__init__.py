"""What device bytes mean: pure, sans-I/O decoders and protocol state machines.

Nothing here touches ports, sockets, files, databases, clocks, threads or asyncio:
bytes and times come in as arguments, events and typed values go out.
"""
