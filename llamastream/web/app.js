// The chat page: streams replies from /chat_stream (JSON lines: a thinking model's reasoning
// apart from its answer); the session cookie keeps the conversation.
(function () {
  "use strict";

  const messages = document.getElementById("messages");
  const input = document.getElementById("input");
  const form = document.getElementById("composer");
  const sendButton = document.getElementById("send");
  const stopButton = document.getElementById("stop");
  const regenerateButton = document.getElementById("regenerate");
  const clearButton = document.getElementById("clear");
  const notice = document.getElementById("notice");
  const settings = document.getElementById("settings");
  const settingsToggle = document.getElementById("settings-toggle");
  const settingsStatus = document.getElementById("settings-status");
  const paramFields = ["temperature", "top_p", "max_new_tokens"];
  const modelName = document.getElementById("model");
  const modelChoice = document.getElementById("model-choice");
  const modelPicker = document.getElementById("model-picker");

  let controller = null; // aborts the running request (or a pending retry)
  let retryTimer = null;
  let modelsSeq = 0; // a model list older than the latest request or choice is dropped
  let modelChange = null; // the pending choice of a model: a promise of whether it was saved

  // Every response sets the session cookie, and one on a session not yet stored names a new
  // one: requests in flight together could leave the cookie of a later-answered request that
  // missed what an earlier one stored (a model just chosen, say). Each request therefore
  // goes out once the one before has its answer's headers (and so its cookie).
  let sessionTurn = Promise.resolve();
  function sessionFetch(url, options) {
    const sent = sessionTurn.then(function () { return fetch(url, options); });
    sessionTurn = sent.then(function () {}, function () {});
    return sent;
  }

  function addMessage(role, text, partial, reasoning) {
    const div = document.createElement("div");
    div.className = "message " + role + (partial ? " partial" : "");
    if (role === "assistant") {
      // A thinking model's reasoning: a collapsed block before the answer.
      const details = document.createElement("details");
      details.className = "reasoning";
      details.hidden = true;
      const summary = document.createElement("summary");
      summary.textContent = "Reasoning";
      const thought = document.createElement("div");
      thought.className = "thought";
      details.append(summary, thought);
      const answer = document.createElement("div");
      answer.className = "answer";
      div.append(details, answer);
    }
    setText(div, role, text, reasoning || "");
    messages.appendChild(div);
    messages.scrollTop = messages.scrollHeight;
    return div;
  }

  function setText(div, role, text, reasoning) {
    if (role === "assistant") {
      const details = div.querySelector(".reasoning");
      details.hidden = !reasoning;
      details.querySelector(".thought").textContent = reasoning;
      div.querySelector(".answer").innerHTML = window.renderMarkdown(text);
      div.dataset.reasoning = reasoning;
    } else {
      div.textContent = text;
    }
    div.dataset.raw = text;
  }

  function lastAssistant() {
    const all = messages.querySelectorAll(".message");
    const last = all[all.length - 1];
    return last && last.classList.contains("assistant") ? last : null;
  }

  function showNotice(text) {
    notice.textContent = text;
    notice.hidden = !text;
  }

  function setBusy(busy) {
    sendButton.disabled = busy;
    regenerateButton.disabled = busy;
    clearButton.disabled = busy;
    modelPicker.disabled = busy || modelChange !== null;
    stopButton.hidden = !busy;
    document.body.dataset.busy = busy ? "1" : "";
  }

  async function loadHistory() {
    const response = await sessionFetch("/get_prompt");
    if (!response.ok) return;
    const data = await response.json();
    messages.textContent = "";
    for (const m of data.messages) addMessage(m.role, m.content, m.partial, m.reasoning);
  }

  async function send(userInput, regenerate) {
    showNotice("");
    setBusy(true);
    controller = new AbortController();
    const userBubble = regenerate ? null : addMessage("user", userInput, false);
    let replaced = null;
    if (regenerate) {
      replaced = lastAssistant();
      if (replaced) replaced.hidden = true;
    }
    const bubble = addMessage("assistant", "", false);
    bubble.classList.add("streaming");
    const body = regenerate ? { regenerate: true } : { user_input: userInput };
    let text = "";
    let reasoning = "";
    const summary = bubble.querySelector(".reasoning summary");
    try {
      // A model just chosen applies to this turn: wait for it to be saved.
      if (modelChange && !(await modelChange)) {
        bubble.remove();
        if (userBubble) userBubble.remove();
        if (replaced) replaced.hidden = false;
        if (!regenerate) input.value = userInput;
        return;
      }
      const response = await sessionFetch("/chat_stream", {
        method: "POST",
        headers: { "content-type": "application/json", accept: "application/x-ndjson" },
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      const error = response.ok ? null : await response.json().catch(function () { return {}; });
      // A model that cannot be loaded for good is told, not retried; one waiting for memory
      // (with a Retry-After) is retried like a busy server.
      const busy = response.status === 429 || (response.status === 503 &&
        (error.error !== "model_unavailable" || response.headers.has("Retry-After")));
      if (busy) {
        const wait = Math.max(1, parseInt(response.headers.get("Retry-After") || "1", 10));
        bubble.remove();
        if (userBubble) userBubble.remove();
        if (replaced) replaced.hidden = false;
        showNotice("The server is busy. Retrying in " + wait + " s…");
        retryTimer = setTimeout(function () {
          retryTimer = null;
          send(userInput, regenerate);
        }, wait * 1000);
        return; // stays busy: Stop cancels the retry
      }
      if (!response.ok) {
        bubble.remove();
        if (userBubble) userBubble.remove();
        if (replaced) replaced.hidden = false;
        showNotice(error.message || "Request failed (" + response.status + ")");
        if (!regenerate) input.value = userInput;
        setBusy(false);
        return;
      }
      if (replaced) replaced.remove();
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let frame = 0; // render at most once per animation frame, however fast text arrives
      const paint = function () {
        frame = 0;
        summary.textContent = text ? "Reasoning" : "Thinking…";
        setText(bubble, "assistant", text, reasoning);
        messages.scrollTop = messages.scrollHeight;
      };
      let pending = ""; // the part of a JSON line still to come
      let failure = null;
      const take = function (line) {
        if (!line) return;
        const event = JSON.parse(line);
        if (event.type === "reasoning") reasoning += event.text;
        else if (event.type === "content") text += event.text;
        else if (event.type === "error") failure = event.message || event.error;
      };
      for (;;) {
        const chunk = await reader.read();
        if (chunk.done) break;
        pending += decoder.decode(chunk.value, { stream: true });
        const complete = pending.split("\n");
        pending = complete.pop();
        complete.forEach(take);
        bubble.dataset.raw = text;
        if (!frame) frame = requestAnimationFrame(paint);
      }
      take(pending + decoder.decode());
      if (frame) cancelAnimationFrame(frame);
      summary.textContent = "Reasoning";
      setText(bubble, "assistant", text, reasoning);
      if (failure) {
        showNotice(failure);
        bubble.classList.add("partial");
      }
    } catch (error) {
      if (text || reasoning) setText(bubble, "assistant", text, reasoning);
      if (error.name === "AbortError") {
        if (text || reasoning) bubble.classList.add("partial");
        else bubble.remove();
      } else {
        showNotice("Connection lost: " + error.message);
        bubble.classList.add("partial");
      }
    } finally {
      bubble.classList.remove("streaming");
      if (!retryTimer) {
        controller = null;
        setBusy(false);
        refreshModels(); // the turn may have loaded its model
      }
    }
  }

  function stop() {
    if (retryTimer) {
      clearTimeout(retryTimer);
      retryTimer = null;
      showNotice("");
      setBusy(false);
    }
    if (controller) controller.abort();
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    const text = input.value;
    if (!text.trim() || sendButton.disabled) return;
    input.value = "";
    send(text, false);
  });

  input.addEventListener("keydown", function (event) {
    // While an IME is composing (Japanese, Chinese...), Enter confirms the conversion.
    if (event.key !== "Enter" || event.shiftKey || event.isComposing || event.keyCode === 229) {
      return;
    }
    event.preventDefault();
    form.requestSubmit();
  });

  stopButton.addEventListener("click", stop);
  regenerateButton.addEventListener("click", function () {
    if (!regenerateButton.disabled) send(null, true);
  });
  clearButton.addEventListener("click", async function () {
    const response = await sessionFetch("/clear_context", { method: "POST" });
    if (response.ok) {
      messages.textContent = "";
      showNotice("");
    } else {
      const error = await response.json().catch(function () { return {}; });
      showNotice(error.message || "Could not clear the conversation");
    }
  });

  settingsToggle.addEventListener("click", function () {
    settings.hidden = !settings.hidden;
    settingsToggle.setAttribute("aria-expanded", String(!settings.hidden));
  });

  async function loadParams() {
    const response = await sessionFetch("/get_generation_params");
    if (!response.ok) return;
    const params = await response.json();
    for (const name of paramFields) document.getElementById(name).value = params[name];
  }

  for (const name of paramFields) {
    document.getElementById(name).addEventListener("change", async function (event) {
      const value = Number(event.target.value);
      const response = await sessionFetch("/set_generation_params", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ [name]: value }),
      });
      const data = await response.json();
      if (response.ok) {
        settingsStatus.textContent = "Saved";
      } else {
        settingsStatus.textContent = data.message || "Invalid value";
        await loadParams();
      }
    });
  }

  function optionText(model) {
    return model.id + " — " + model.state;
  }

  // The model picker: every model with its state, the session's selected; hidden when there
  // is only one model, so that page looks as it always has.
  async function refreshModels() {
    const seq = ++modelsSeq;
    const response = await sessionFetch("/get_models").catch(function () { return null; });
    if (!response || !response.ok) return;
    const data = await response.json();
    if (seq !== modelsSeq || modelChange) return; // a newer list or a choice came since
    const ids = data.models.map(function (m) { return m.id; });
    const same = ids.length === modelPicker.options.length &&
      ids.every(function (id, i) { return modelPicker.options[i].value === id; });
    if (!same) {
      // Only a changed list is rebuilt: an open drop-down keeps its options.
      modelPicker.textContent = "";
      for (const id of ids) {
        const option = document.createElement("option");
        option.value = id;
        modelPicker.appendChild(option);
      }
    }
    data.models.forEach(function (model, i) {
      const option = modelPicker.options[i];
      option.textContent = optionText(model);
      option.title = model.error || "";
    });
    modelPicker.value = data.model;
    modelChoice.hidden = ids.length < 2;
    if (!modelChoice.hidden) modelName.textContent = ""; // the picker names the model
  }

  modelPicker.addEventListener("focus", refreshModels);
  modelPicker.addEventListener("change", function () {
    const chosen = modelPicker.value;
    modelsSeq++; // a list fetched before this choice would select the old model again
    showNotice("");
    modelChange = (async function () {
      try {
        const response = await sessionFetch("/set_generation_params", {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ model: chosen }),
        });
        if (response.ok) return true;
        const error = await response.json().catch(function () { return {}; });
        showNotice(error.message || "Could not choose the model (" + response.status + ")");
      } catch (error) {
        showNotice("Connection lost: " + error.message);
      }
      return false;
    })();
    modelPicker.disabled = true;
    modelChange.then(function () {
      modelChange = null;
      modelPicker.disabled = sendButton.disabled;
      refreshModels(); // the states, and the session's model as the server has it
    });
  });

  sessionFetch("/health").then(function (r) { return r.json(); }).then(function (health) {
    if (modelChoice.hidden) modelName.textContent = health.model || "";
  }).catch(function () {});
  loadHistory();
  loadParams();
  refreshModels();
})();
