"""`pdg serve`: an OpenAI-compatible HTTP server over the engine, with draft events, infill, edit
and a web page.

    prompts.py   messages / prompts -> token ids, and committed canvases -> streamed text
    canvas.py    infill and edit as pinned positions and a starting canvas
    worker.py    the one thread that owns the engine, and the asyncio side of a request
    schemas.py   request bodies (pydantic) and the OpenAI error object
    app.py       the Starlette app, its routes and `serve`
    static/      the web page (plain HTML, CSS and JavaScript; no build step)

Only app.py and schemas.py import the web stack, so `pdg chat` uses prompts.py without it.
"""
