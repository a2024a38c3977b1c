"""ChatStream's basic endpoint.

Run: LLAMASTREAM_MODEL_PATH=models/x.gguf uvicorn examples.basic:app
"""

from fastapi import FastAPI, Request

from llamastream import ChatStream, DiskSessionStore, SessionMiddleware

chat_stream = ChatStream()  # settings from LLAMASTREAM_* environment variables
app = FastAPI(lifespan=chat_stream.lifespan)
app.add_middleware(SessionMiddleware, store=DiskSessionStore(chat_stream.settings.session_dir))


@app.post("/chat_stream")
async def stream_api(request: Request):
    response = await chat_stream.handle_chat_stream_request(request)
    return response
