"""ChatStream's endpoint with a completion callback that prints the conversation."""

from fastapi import FastAPI, Request

from llamastream import ChatStream, DiskSessionStore, SessionMiddleware

chat_stream = ChatStream()  # settings from LLAMASTREAM_* environment variables
app = FastAPI(lifespan=chat_stream.lifespan)
app.add_middleware(SessionMiddleware, store=DiskSessionStore(chat_stream.settings.session_dir))


@app.post("/chat_stream")
async def stream_api(request: Request):
    def callback_func(request, message):
        session_mgr = getattr(request.state, "session", None)
        session = session_mgr.get_session()
        chat_prompt = session.get("chat_prompt")
        print(chat_prompt.create_prompt())

    response = await chat_stream.handle_chat_stream_request(request, callback=callback_func)
    return response
