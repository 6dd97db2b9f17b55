"""The HTTP side of gemma-jax: Workers AI's REST API (and OpenAI routes) over Flask + gunicorn.

Entry points: `serving.app.create_app(backend, ...)`, `serving.server.serve(backend_factory, ...)`,
`serving.cli.add_serve_arguments` / `run_serve`. The only thing it needs from the engine side is a
`serving.backend.Backend`. See serving/README.md for the API contract and the decisions taken.
"""
