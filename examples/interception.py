"""ChatStream's endpoint that reads the body itself before handing it on."""

import json

from fastapi import FastAPI, Request

from llamastream import ChatStream, DiskSessionStore, SessionMiddleware

chat_stream = ChatStream()  # settings from LLAMASTREAM_* environment variables
app = FastAPI(lifespan=chat_stream.lifespan)
app.add_middleware(SessionMiddleware, store=DiskSessionStore(chat_stream.settings.session_dir))


@app.post("/chat_stream")
async def stream_api(request: Request):
    request_body = await request.body()
    data = json.loads(request_body)
    user_input = data["user_input"]  # noqa: F841
    regenerate = data["regenerate"]  # noqa: F841
    response = await chat_stream.handle_chat_stream_request(request, request_body)
    return response
