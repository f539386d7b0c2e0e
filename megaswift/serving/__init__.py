"""megaswift's HTTP servers on one FastAPI/uvicorn stack: ``app.py`` (limits, errors, API key, runner),
``openai_routes.py`` (``megaswift deploy``'s OpenAI-compatible API)."""
