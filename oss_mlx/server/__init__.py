"""The OpenAI-compatible HTTP server (`oss-mlx serve`): the FastAPI app (app.py) around one
`Service` (service.py); one module per endpoint (chat_completions.py, responses.py); the request
shapes (protocol.py) apart from their mapping to harmony (conversation.py, constraints.py); and
what a client sees of a turn (wire.py).

    from oss_mlx.server import create_app
"""


def create_app(*args, **kwargs):
    """The FastAPI app serving an engine (see oss_mlx.server.app.create_app)."""
    from oss_mlx.server.app import create_app as build

    return build(*args, **kwargs)
