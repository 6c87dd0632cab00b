"""A plain ASGI application for uvicorn: GET /hello answers with the request's path."""


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = f"hello from {scope['path']}\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})
