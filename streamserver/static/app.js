// Live captions: microphone → /asr (WhisperLiveKit's protocol) → captions on the page.
//
// Start: ask for the microphone, open the socket, wait for the server's `config`
// message, then stream: MediaRecorder webm/opus blobs (every 250 ms) by default, or
// 16 kHz s16le PCM from an AudioWorklet when `config.useAudioWorklet` is true.
// Stop: finish the recording, send an empty binary frame (end of stream), keep
// showing updates until `{"type": "ready_to_stop"}` and the server's close.
// A dropped connection (no close frame: the network went) is resumed: the page
// keeps recording, reconnects with the `resume_token` of the last `config`, and
// resends what the server had not received (`received_bytes`) before going on.
// Updates come incremental (`?updates=incremental`: the lines that changed, captions.js), and the
// `config`'s `viewer_url` is offered as a link: a read-only page of the same captions (watch.js).
"use strict";

(() => {
  const TIMESLICE_MS = 250;
  const CONFIG_WAIT_MS = 5000; // a server that sends no `config` gets the default recorder after this
  const STOP_WAIT_MS = 120000; // after Stop, give up on the server's close after this
  const TOKEN_KEY = "streamserver.token";
  const RESUME_FOR_MS = 30000; // how long to keep trying to resume a dropped stream
  const RESUME_RETRY_MS = 1000;
  const KEEP_SENT_BYTES = 16 * 1024 * 1024; // audio kept for resending after a drop

  const $ = (id) => document.getElementById(id);
  const ui = {
    body: document.body,
    button: $("start"),
    status: $("status"),
    device: $("device"),
    level: $("level"),
    tokenForm: $("token-form"),
    token: $("token"),
    notice: $("notice"),
    captions: $("captions"),
    lag: $("lag"),
    format: $("format"),
    share: $("share"),
  };
  const pageQuery = new URLSearchParams(location.search);

  let run = null; // the current stream: socket, microphone, audio graph, recorder

  // ---- what a close means to the person reading the page --------------------------------

  /** The text shown for a close `code`/`reason` (and the error message that came before it). */
  function closeMessage(code, reason, errorText, hadToken) {
    const r = reason || "";
    const detail = errorText || r;
    const gpu = /GPU (\d+)/.exec(detail);
    if (code === 1008 && r === "No GPU resources available")
      return { kind: "warn", text: "All GPUs are busy, try again shortly." };
    if (code === 1008 && r === "Unauthorized")
      return {
        kind: "warn",
        askToken: true,
        text: hadToken
          ? "The server did not accept this access token. Check it and press Start again."
          : "This server needs an access token. Enter it below and press Start.",
      };
    if (code === 1008 && r === "Origin not allowed")
      return {
        kind: "error",
        text: `This server does not accept connections from ${location.origin} ` +
          "(Origin not allowed). Its operator can add this address to --allowed-origins.",
      };
    if (code === 1001 && r.startsWith("Server is draining"))
      return { kind: "warn", text: "The server is restarting and not taking new streams. Try again in a moment." };
    if (code === 1001)
      return { kind: "warn", text: "The server is shutting down. The captions above are all it finished." };
    if (code === 1003) return { kind: "error", text: `The server expected audio frames (${detail}).` };
    if (code === 1007)
      return { kind: "error", text: `The server could not decode this browser's audio (${detail}).` };
    if (code === 1009) return { kind: "error", text: `An audio chunk was too large for the server (${detail}).` };
    if (code === 1011 && detail.startsWith("GPU memory full"))
      return { kind: "error", text: `GPU ${gpu ? gpu[1] : ""} ran out of memory. Try again shortly. (${detail})` };
    if (code === 1011 && detail.startsWith("Model load failed"))
      return { kind: "error", text: `The speech model could not be loaded on GPU ${gpu ? gpu[1] : ""}. (${detail})` };
    if (code === 1011) return { kind: "error", text: `The server hit an internal error. Try again. (${detail})` };
    if (code === 1008) return { kind: "error", text: `The server refused the connection: ${detail || "policy violation"}.` };
    if (code === 1006) return { kind: "error", text: "Lost the connection to the server." };
    return { kind: "error", text: `The connection closed (code ${code}${detail ? ": " + detail : ""}).` };
  }

  function microphoneMessage(err) {
    const name = err && err.name;
    if (name === "NotAllowedError" || name === "SecurityError")
      return "Microphone access was refused. Allow it in the browser's site settings and press Start again.";
    if (name === "NotFoundError" || name === "OverconstrainedError") return "No microphone was found.";
    if (name === "NotReadableError") return "The microphone is in use by another application.";
    return `Could not open the microphone (${(err && err.message) || err}).`;
  }

  // ---- page state ------------------------------------------------------------------

  const BUTTON = {
    idle: ["Start", false], starting: ["Cancel", false], connecting: ["Cancel", false],
    streaming: ["Stop", false], stopping: ["Finishing…", true], finished: ["Start", false], failed: ["Start", false],
  };

  function setState(state, text) {
    ui.body.dataset.state = state;
    const [label, disabled] = BUTTON[state];
    ui.button.textContent = label;
    ui.button.disabled = disabled;
    ui.button.classList.toggle("danger", state === "streaming");
    if (text !== undefined) ui.status.textContent = text;
  }

  function showNotice(kind, text) {
    ui.notice.className = `notice ${kind}`;
    ui.notice.textContent = text;
    ui.notice.hidden = false;
  }

  function clearNotice() {
    ui.notice.hidden = true;
    ui.notice.textContent = "";
  }

  function showTokenField(focus) {
    ui.tokenForm.hidden = false;
    if (focus) ui.token.focus();
  }

  // ---- captions (captions.js) -------------------------------------------------------

  const captions = window.StreamCaptions.create({ captions: ui.captions, lag: ui.lag });

  /** An update from the server; one that does not follow the last (incremental mode) asks for all again. */
  function render(update) {
    if (!captions.apply(update) && run && run.ws && run.ws.readyState === WebSocket.OPEN)
      run.ws.send(JSON.stringify({ type: "snapshot" }));
  }

  // ---- level meter -----------------------------------------------------------------

  function startMeter(r) {
    const analyser = r.ctx.createAnalyser();
    analyser.fftSize = 1024;
    r.source.connect(analyser);
    const samples = new Float32Array(analyser.fftSize);
    let peak = 0;
    const tick = () => {
      if (run !== r || !r.meterOn) return;
      analyser.getFloatTimeDomainData(samples);
      let sum = 0;
      for (const s of samples) sum += s * s;
      const db = 10 * Math.log10(sum / samples.length + 1e-12); // RMS in dBFS
      const level = Math.max(0, Math.min(1, (db + 60) / 55)); // -60 dB → empty, -5 dB → full
      ui.level.style.transform = `scaleX(${level.toFixed(3)})`;
      ui.level.classList.toggle("hot", level > 0.9);
      if (level > peak) {
        peak = level;
        ui.level.dataset.peak = peak.toFixed(2);
      }
      requestAnimationFrame(tick);
    };
    r.meterOn = true;
    requestAnimationFrame(tick);
  }

  // ---- recording -------------------------------------------------------------------

  function recorderType() {
    if (typeof MediaRecorder === "undefined") return null;
    for (const type of ["audio/webm;codecs=opus", "audio/ogg;codecs=opus", "audio/webm"])
      if (MediaRecorder.isTypeSupported(type)) return type;
    return null;
  }

  /** Send a frame after every frame queued before it (a Blob is read into an ArrayBuffer first). */
  function send(r, data) {
    if (r.ended) return r.outbox; // nothing may follow the end of stream
    r.outbox = (r.outbox || Promise.resolve())
      .then(() => (data instanceof Blob ? data.arrayBuffer() : data))
      .then((bytes) => {
        if (bytes.byteLength) remember(r, bytes);
        if (r.ws.readyState === WebSocket.OPEN && !r.resuming) r.ws.send(bytes);
      })
      .catch(() => {});
    return r.outbox;
  }

  /** Every frame recorded, with its offset in the stream, for resending after a drop (the newest 16 MB). */
  function remember(r, bytes) {
    r.sent = r.sent || [];
    r.sent.push({ at: r.sentBytes || 0, bytes });
    r.sentBytes = (r.sentBytes || 0) + bytes.byteLength;
    r.keptBytes = (r.keptBytes || 0) + bytes.byteLength;
    while (r.keptBytes > KEEP_SENT_BYTES && r.sent.length > 1) r.keptBytes -= r.sent.shift().bytes.byteLength;
  }

  /** After a resume: everything from the byte the server got to, then the stream goes on as before. */
  function resendFrom(r, offset) {
    for (const frame of r.sent || []) {
      const end = frame.at + frame.bytes.byteLength;
      if (end <= offset) continue;
      r.ws.send(frame.at >= offset ? frame.bytes : frame.bytes.slice(offset - frame.at));
    }
  }

  function startMediaRecorder(r) {
    const type = recorderType();
    r.recorder = new MediaRecorder(r.stream, type ? { mimeType: type } : undefined);
    r.recorder.ondataavailable = (event) => {
      if (event.data && event.data.size > 0) send(r, event.data); // never an empty frame: that ends the stream
    };
    r.recorder.start(TIMESLICE_MS);
    ui.format.textContent = `${(r.recorder.mimeType || type || "audio").split(";")[0]} · MediaRecorder`;
  }

  async function startWorklet(r) {
    await r.ctx.audioWorklet.addModule("/static/pcm-worklet.js");
    r.worklet = new AudioWorkletNode(r.ctx, "pcm-downsampler", {
      numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1], channelCount: 1, channelCountMode: "explicit",
    });
    r.worklet.port.onmessage = (event) => {
      if (event.data instanceof ArrayBuffer) send(r, event.data);
      else if (event.data && event.data.type === "flushed" && r.onFlushed) r.onFlushed();
    };
    r.source.connect(r.worklet);
    r.worklet.connect(r.ctx.destination); // it outputs silence; connected so the graph runs it
    ui.format.textContent = `16 kHz PCM · AudioWorklet (from ${r.ctx.sampleRate / 1000} kHz)`;
  }

  async function beginStreaming(r, useWorklet) {
    if (r.recording) return;
    r.recording = true;
    clearTimeout(r.configTimer);
    if (r.ctx.state === "suspended") await r.ctx.resume().catch(() => {});
    try {
      if (useWorklet) await startWorklet(r);
      else startMediaRecorder(r);
    } catch (err) {
      showNotice("error", `Could not start recording: ${err.message || err}`);
      r.failed = true;
      r.ws.close(1000);
      return;
    }
    if (run !== r || r.stopping) return;
    setState("streaming", "Listening. Speak now.");
    if (navigator.wakeLock) navigator.wakeLock.request("screen").then((l) => { r.wakeLock = l; }, () => {});
  }

  /** Stop capturing and hand the server everything recorded so far. */
  async function finishRecording(r) {
    if (r.recorder && r.recorder.state !== "inactive") {
      const stopped = new Promise((resolve) => r.recorder.addEventListener("stop", resolve, { once: true }));
      r.recorder.stop(); // fires the last `dataavailable` before `stop`
      await stopped;
    }
    if (r.worklet) {
      r.source.disconnect(r.worklet); // no new audio; what it holds comes before "flushed"
      await new Promise((resolve) => {
        r.onFlushed = resolve;
        r.worklet.port.postMessage({ type: "flush" });
        setTimeout(resolve, 500);
      });
      r.worklet.port.onmessage = null;
    }
  }

  function releaseAudio(r) {
    r.meterOn = false;
    if (r.recorder && r.recorder.state !== "inactive") {
      r.recorder.ondataavailable = null;
      r.recorder.stop();
    }
    if (r.worklet) r.worklet.port.onmessage = null;
    r.stream.getTracks().forEach((t) => t.stop());
    if (r.ctx.state !== "closed") r.ctx.close().catch(() => {});
    if (r.wakeLock) r.wakeLock.release().catch(() => {});
    ui.level.style.transform = "scaleX(0)";
  }

  // ---- the socket ------------------------------------------------------------------

  function socketUrl(token, wantPcm, resumeToken) {
    const params = new URLSearchParams({ updates: "incremental" }); // only what changed: an hour stays light
    if (resumeToken) params.set("resume", resumeToken);
    for (const name of ["format", "language"]) if (pageQuery.get(name)) params.set(name, pageQuery.get(name));
    if (wantPcm && !params.has("format")) params.set("format", "pcm");
    if (token) params.set("token", token);
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const query = params.toString();
    return `${scheme}//${location.host}/asr${query ? "?" + query : ""}`;
  }

  function showDevice(config) {
    const where = config.device === "cpu" ? "CPU" : `GPU ${config.gpu_id}` + (config.device ? ` · ${config.device}` : "");
    ui.device.textContent = config.model ? `${where} · ${config.model}` : where;
    ui.device.title = config.connection_id ? `connection ${config.connection_id}` : "";
    ui.device.hidden = false;
    if (config.viewer_url) {
      ui.share.href = new URL(config.viewer_url, location.href).href;
      ui.share.hidden = false;
    }
  }

  function onMessage(r, event) {
    const msg = window.StreamCaptions.parse(event.data);
    if (!msg) return;
    if (msg.type === "config") {
      r.config = msg;
      r.resumeToken = msg.resume_token || null;
      showDevice(msg);
      if (msg.resumed) {
        r.resuming = false;
        resendFrom(r, msg.received_bytes || 0);
        if (r.ended) r.ws.send(new ArrayBuffer(0)); // the end of stream was lost too
        clearNotice();
        setState(r.stopping ? "stopping" : "streaming", r.stopping
          ? "Finishing: the last words are on their way…" : "Reconnected. Listening.");
        return;
      }
      if (!r.stopping) beginStreaming(r, !!msg.useAudioWorklet);
    } else if (msg.type === "ready_to_stop") {
      r.readyToStop = true;
      ui.status.textContent = "All audio processed.";
      // The server closes next; a server that does not is closed from here.
      r.closeTimer = setTimeout(() => r.ws.close(1000), 3000);
    } else if (msg.type === "error") {
      r.error = msg.error || "error";
      showNotice("error", r.error);
    } else if (Array.isArray(msg.lines)) {
      render(msg);
    }
  }

  /** The network dropped mid-stream: keep recording and come back to the same stream. */
  function resume(r) {
    r.resuming = true;
    r.resumeUntil = r.resumeUntil || Date.now() + RESUME_FOR_MS;
    showNotice("warn", "Connection lost. Reconnecting…");
    setState("connecting", "Reconnecting…");
    r.resumeTimer = setTimeout(() => connect(r, r.resumeToken), RESUME_RETRY_MS);
  }

  function onClose(r, event) {
    if (event.code === 1006 && r.resumeToken && r.recording && !r.readyToStop && !r.cancelled &&
        Date.now() < (r.resumeUntil || Infinity)) {
      clearTimeout(r.closeTimer);
      resume(r);
      return;
    }
    r.resumeUntil = null;
    clearTimeout(r.configTimer);
    clearTimeout(r.closeTimer);
    clearTimeout(r.stopTimer);
    releaseAudio(r);
    if (run === r) run = null;
    const normal = event.code === 1000 || event.code === 1005;
    if (normal && r.cancelled) {
      setState("idle", "Cancelled. Press Start to try again.");
      return;
    }
    if (normal && r.failed) { // the notice says why
      setState("failed", "Press Start to try again.");
      return;
    }
    if (normal && (r.readyToStop || r.stopping)) {
      ui.lag.textContent = "";
      const count = captions.speechLines();
      setState("finished", r.readyToStop
        ? `Finished. ${count} caption line${count === 1 ? "" : "s"}.`
        : "Stopped. The server closed before confirming that it had processed all the audio.");
      return;
    }
    if (!r.opened) {
      showNotice("error", `Could not reach the server at ${location.host}. Is it running?`);
      setState("failed", "Press Start to try again.");
      return;
    }
    const m = closeMessage(event.code, event.reason, r.error, !!r.token);
    showNotice(m.kind, m.text);
    if (m.askToken) showTokenField(true);
    setState("failed", "Stopped. Press Start to try again.");
  }

  function connect(r, resumeToken) {
    const ws = new WebSocket(socketUrl(r.token, r.wantPcm, resumeToken));
    ws.binaryType = "arraybuffer";
    r.ws = ws;
    ws.onopen = () => {
      r.opened = true;
      if (resumeToken) {
        r.resumeUntil = null; // reached the server: its answer decides now
        return;
      }
      if (r.stopping) return;
      setState("connecting", "Connected. Waiting for the server…");
      // WhisperLiveKit servers before `config` existed never send one: stream webm anyway.
      r.configTimer = setTimeout(() => beginStreaming(r, r.wantPcm), CONFIG_WAIT_MS);
    };
    ws.onmessage = (event) => onMessage(r, event);
    ws.onclose = (event) => onClose(r, event);
  }

  // ---- buttons ---------------------------------------------------------------------

  async function start() {
    clearNotice();
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      showNotice("error", "This browser gives the microphone only to https:// pages (or localhost). " +
        "Open the page over https (streamserver --ssl-certfile/--ssl-keyfile).");
      return;
    }
    const token = ui.token.value.trim();
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);

    const ctx = new (window.AudioContext || window.webkitAudioContext)(); // made in the click: allowed to run
    const wantPcm = pageQuery.get("format") === "pcm" || (!recorderType() && !!ctx.audioWorklet);
    const r = { ctx, token, wantPcm };
    run = r;
    setState("starting", "Asking for the microphone…");
    try {
      r.stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (err) {
      ctx.close().catch(() => {});
      run = null;
      showNotice("error", microphoneMessage(err));
      setState("failed", "Press Start to try again.");
      return;
    }
    if (r.cancelled) {
      r.stream.getTracks().forEach((t) => t.stop());
      ctx.close().catch(() => {});
      return;
    }
    captions.clear();
    ui.device.hidden = true;
    ui.share.hidden = true;
    ui.format.textContent = "";
    r.source = ctx.createMediaStreamSource(r.stream);
    startMeter(r);
    setState("connecting", "Connecting…");
    connect(r);
  }

  async function stop(r) {
    if (r.stopping) return;
    r.stopping = true;
    if (!r.recording) { // nothing sent yet: just leave
      r.cancelled = true;
      if (r.ws) r.ws.close(1000);
      else {
        run = null;
        setState("idle", "Cancelled.");
      }
      return;
    }
    setState("stopping", "Finishing: the last words are on their way…");
    await finishRecording(r);
    const sent = send(r, new ArrayBuffer(0)); // end of stream, after the last audio
    r.ended = true;
    await sent;
    r.meterOn = false;
    r.stream.getTracks().forEach((t) => t.stop()); // the microphone is free now
    ui.level.style.transform = "scaleX(0)";
    r.stopTimer = setTimeout(() => r.ws.close(1000), STOP_WAIT_MS);
  }

  ui.button.addEventListener("click", () => (run ? stop(run) : start()));
  ui.tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!run) start();
  });

  const savedToken = pageQuery.get("token") || localStorage.getItem(TOKEN_KEY);
  if (savedToken) {
    ui.token.value = savedToken;
    showTokenField(false);
  }

  // For tests and for anyone embedding the page.
  window.streamserverPage = { closeMessage, render };
})();
