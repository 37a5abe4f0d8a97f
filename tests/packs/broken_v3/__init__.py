"""A V3 pack whose entry point raises while registering."""


async def comfy_entrypoint():
    raise RuntimeError("extension setup failed")
