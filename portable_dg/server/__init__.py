"""`pdg serve`: an OpenAI-compatible HTTP server over the engine, with draft events, infill, edit
and a web page.

    prompts.py   messages / prompts -> token ids, and committed canvases -> streamed text
    canvas.py    infill and edit as pinned positions and a starting canvas
    worker.py    the one thread that owns the engine, and the asyncio side of a request
    generation.py  one request's events: drafts, text as canvases commit, the finish
    schemas.py   request bodies (pydantic) and the OpenAI error object
    service.py   limits, admission, and answering by stream or JSON
    endpoints.py the routes' handlers and response shapes
    app.py       the Starlette app and the uvicorn server
    static/      the web page (plain HTML, CSS and JavaScript; no build step)

prompts.py, canvas.py, worker.py and generation.py do not import the web stack, so `pdg chat`
uses prompts.py without it.
"""
