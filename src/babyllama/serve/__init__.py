"""`babyllama serve`: an OpenAI-compatible server with continuous batching and a chat page.

app.py is the HTTP side (FastAPI), page.html the chat page, stage.py loads a run and starts uvicorn;
the batching itself is the inference engine's (infer/batching.py)."""
