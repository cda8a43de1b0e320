// A viewer's page: the captions of someone else's stream, read-only (/watch/<id>?key=KEY).
//
// Opens WS /asr/watch/<id>?key=KEY, shows the stream's captions as they form (incremental updates,
// captions.js; one that does not follow the last asks for a snapshot), and says why when it ends.
// A dropped connection is retried for a while: the stream goes on without its viewers.
"use strict";

(() => {
  const RETRY_MS = 2000;
  const RETRY_FOR_MS = 60000;
  const $ = (id) => document.getElementById(id);
  const ui = { body: document.body, status: $("status"), notice: $("notice"), device: $("device"),
    captions: $("captions"), lag: $("lag") };
  const captions = window.StreamCaptions.create({ captions: ui.captions, lag: ui.lag });
  const streamId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop() || "");
  const key = new URLSearchParams(location.search).get("key") || "";
  let retryUntil = null;

  function setState(state, text) {
    ui.body.dataset.state = state;
    ui.status.textContent = text;
  }

  function showNotice(kind, text) {
    ui.notice.className = `notice ${kind}`;
    ui.notice.textContent = text;
    ui.notice.hidden = !text;
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${scheme}//${location.host}/asr/watch/${encodeURIComponent(streamId)}?key=${encodeURIComponent(key)}`;
    const ws = new WebSocket(url);
    let configured = false;
    ws.onmessage = (event) => {
      const msg = window.StreamCaptions.parse(event.data);
      if (!msg) return;
      if (msg.type === "config") {
        configured = true;
        retryUntil = null;
        captions.clear("Waiting for the speaker…");
        ui.device.textContent = msg.device === "cpu" ? `CPU · ${msg.model}` : `GPU ${msg.gpu_id} · ${msg.model}`;
        ui.device.hidden = false;
        showNotice("", "");
        setState("streaming", "Live.");
      } else if (Array.isArray(msg.lines)) {
        if (!captions.apply(msg)) ws.send(JSON.stringify({ type: "snapshot" }));
      }
    };
    ws.onclose = (event) => {
      if (event.code === 1008 && event.reason === "Unknown stream") {
        showNotice("warn", configured ? "The stream has ended." : "This stream has ended, or the viewer link is not right.");
        setState("finished", configured ? "Ended." : "Nothing to show.");
      } else if (event.code === 1013) {
        showNotice("warn", "This stream has as many viewers as it allows. Try again later.");
        setState("failed", "Not connected.");
      } else if (event.code === 1000) {
        {
          const n = captions.speechLines();
          setState("finished", `The stream has ended. ${n} caption line${n === 1 ? "" : "s"}.`);
        }
      } else if (event.code === 1001) {
        setState("finished", "The server is shutting down. The captions above are all it finished.");
      } else {
        retryUntil = retryUntil || Date.now() + RETRY_FOR_MS;
        if (Date.now() < retryUntil) {
          showNotice("warn", "Connection lost. Reconnecting…");
          setState("connecting", "Reconnecting…");
          setTimeout(connect, RETRY_MS);
        } else {
          showNotice("error", "Lost the connection to the server.");
          setState("failed", "Not connected.");
        }
      }
    };
  }

  connect();
  window.streamserverViewer = { captions };
})();
