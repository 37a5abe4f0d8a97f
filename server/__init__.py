"""The aiohttp server, the durable queue and history, and the command line."""
