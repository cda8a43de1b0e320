// Caption lines on a page, from /asr updates: the speaker's page (app.js) and a viewer's (watch.js).
//
// An update is whole (`full` mode: every line) or incremental (`from_line`, `seq`: the lines from
// `from_line` on, every line before it unchanged). Only lines that changed are rebuilt on screen,
// so an hour of captions costs each update what changed, not the whole transcript.
"use strict";

window.StreamCaptions = (() => {
  const SILENCE = -2;
  const SPEAKER_COLORS = 8; // --speaker-1 … --speaker-8 in style.css

  function speakerColor(speaker) {
    return speaker > 0 ? `var(--speaker-${((speaker - 1) % SPEAKER_COLORS) + 1})` : "var(--muted)";
  }

  function shortTime(text, seconds) {
    if (typeof text === "string" && text) return text.replace(/^0:(?=\d\d:)/, ""); // H:MM:SS.cc → MM:SS.cc
    if (typeof seconds !== "number") return "";
    const m = Math.floor(seconds / 60);
    const s = (seconds - 60 * m).toFixed(2).padStart(5, "0");
    return `${String(m).padStart(2, "0")}:${s}`;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function timeRange(line) {
    const t = el("time", "when", `${shortTime(line.start, line.start_s)} – ${shortTime(line.end, line.end_s)}`);
    if (typeof line.start_s === "number") t.dateTime = `PT${line.start_s}S`;
    return t;
  }

  function lineElement(line) {
    if (line.speaker === SILENCE) {
      const gap = el("div", "gap");
      const seconds = typeof line.start_s === "number" ? ` ${(line.end_s - line.start_s).toFixed(1)} s` : "";
      gap.append(el("span", "gap-label", `silence${seconds}`), timeRange(line));
      return gap;
    }
    const row = el("div", "line");
    row.dataset.speaker = String(line.speaker);
    row.style.setProperty("--speaker", speakerColor(line.speaker));
    const meta = el("div", "meta");
    meta.append(el("span", "who", line.speaker > 0 ? `Speaker ${line.speaker}` : "Speaker …"), timeRange(line));
    row.append(meta, el("p", "text", line.text || ""));
    return row;
  }

  function spaced(host, text) {
    const before = host.textContent;
    return before && !/\s$/.test(before) && !/^\s/.test(text) ? " " + text : text;
  }

  /** Captions drawn into `ui.captions` (lag figures into `ui.lag`, when given). */
  function create(ui) {
    let lines = []; // every line the server has sent, as it sent them
    let rendered = []; // [{key, el}] for each line on screen
    let seq = 0;

    /** Take an update; false when it does not follow the last one (ask the server for a snapshot). */
    function apply(update) {
      const incoming = Array.isArray(update.lines) ? update.lines : [];
      let from = 0;
      if (typeof update.from_line === "number") {
        from = update.from_line;
        if (from > 0 && (update.seq !== seq + 1 || from > lines.length)) return false;
        seq = update.seq;
      }
      lines = lines.slice(0, from).concat(incoming);
      draw(update, from);
      return true;
    }

    function draw(update, from) {
      const atBottom = ui.captions.scrollHeight - ui.captions.scrollTop - ui.captions.clientHeight < 40;
      ui.captions.querySelectorAll(".placeholder, .pending, .buffer").forEach((n) => n.remove());
      for (let i = from; i < lines.length; i++) {
        const line = lines[i];
        const key = JSON.stringify([line.speaker, line.text, line.start, line.end]);
        if (rendered[i] && rendered[i].key === key) continue;
        const node = lineElement(line);
        if (rendered[i]) rendered[i].el.replaceWith(node);
        else ui.captions.append(node);
        rendered[i] = { key, el: node };
      }
      rendered.splice(lines.length).forEach((r) => r.el.remove());

      // Words not final yet, greyed: after the last speech line, or on a row of their own.
      const diar = update.buffer_diarization || "";
      const trans = update.buffer_transcription || "";
      if (diar.trim() || trans.trim()) {
        const last = lines[lines.length - 1];
        let host;
        if (last && last.speaker !== SILENCE) {
          host = rendered[lines.length - 1].el.querySelector(".text");
        } else {
          const row = el("div", "line pending");
          row.style.setProperty("--speaker", "var(--muted)");
          const meta = el("div", "meta");
          meta.append(el("span", "who", "…"));
          host = el("p", "text");
          row.append(meta, host);
          ui.captions.append(row);
        }
        if (diar.trim()) host.append(el("span", "buffer buffer-diarization", spaced(host, diar)));
        if (trans.trim()) host.append(el("span", "buffer buffer-transcription", spaced(host, trans)));
      }
      if (!ui.captions.children.length) {
        const quiet = update.status === "no_audio_detected";
        ui.captions.append(el("p", "placeholder", quiet ? "Listening… no speech yet." : "Captions appear here as you speak."));
      }
      if (atBottom) ui.captions.scrollTop = ui.captions.scrollHeight;

      if (!ui.lag) return;
      const lagT = Number(update.remaining_time_transcription) || 0;
      const lagD = Number(update.remaining_time_diarization) || 0;
      const parts = [];
      if (lagT > 0.1) parts.push(`transcription ${lagT.toFixed(1)} s behind`);
      if (lagD > 0.1) parts.push(`speakers ${lagD.toFixed(1)} s behind`);
      ui.lag.textContent = parts.join(" · ");
    }

    function clear(placeholder) {
      lines = [];
      rendered = [];
      seq = 0;
      ui.captions.replaceChildren(el("p", "placeholder", placeholder || "Captions appear here as you speak."));
      if (ui.lag) ui.lag.textContent = "";
    }

    /** Caption lines on screen that hold speech (not silences). */
    function speechLines() {
      return rendered.filter((x) => x.el.classList.contains("line")).length;
    }

    return { apply, clear, speechLines, lines: () => lines };
  }

  /** A text frame from the server as an object; null for anything else (binary, not JSON). */
  function parse(data) {
    if (typeof data !== "string") return null;
    try {
      return JSON.parse(data);
    } catch {
      return null;
    }
  }

  return { create, parse };
})();
