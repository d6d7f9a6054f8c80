"""`diffcli serve`: an OpenAI-compatible HTTP server (vLLM's API) with a live canvas page.

    protocol    request bodies, error objects, response shapes
    runner      request -> prompt, budget, sampler (prepare_*); the generation itself (Runner)
    scheduler   one model, a FIFO queue, one worker thread, cancellation
    app         the Starlette routes and SSE streams
    server      socket, uvicorn, background loading, graceful SIGTERM
    page.html   the canvas page served at /

Needs the `serve` extra (starlette, uvicorn, sse-starlette, pydantic).
"""
