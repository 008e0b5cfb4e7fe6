// Page wiring: persona panel, start/stop, status, transcript, stats and notices.

import { chooseEncoderConfig } from "./capture.js";
import { canDecodeOpus } from "./playback.js";
import { DEFAULT_PROMPT, EXAMPLE_PERSONAS, MAX_PROMPT_CHARS, REFERENCE_VOICES, voiceLabel } from "./personas.js";
import { ChatSession } from "./session.js";
import { loadVoices, uploadVoice } from "./voices.js";

const $ = (id) => document.getElementById(id);
const SETTINGS_KEY = "personaplex.settings";
const SAMPLING_DEFAULTS = { text_temperature: "0.7", text_topk: "25", audio_temperature: "0.8", audio_topk: "250",
  seed: "-1" };
const SAMPLING_FIELDS = { text_temperature: "text-temperature", text_topk: "text-topk",
  audio_temperature: "audio-temperature", audio_topk: "audio-topk", seed: "seed" };
const TRANSCRIPT_PAUSE_MS = 1500; // a gap this long between text pieces starts a new paragraph
const AUDIO_START_TIMEOUT_MS = 5000;

// Read-only view of the page's state for people debugging in the console (and for automated tests).
const debug = {
  state: "idle",
  voices: [],
  notices: [],
  metadata: [],
  serverErrors: [],
  stats: { playback: null, microphone: null },
  counters: null,
  sentSeconds: null,
  transcript: () => $("transcript").textContent,
};
window.personaplex = debug;

let session = null;
let audioContext = null;
let microphone = null;
let uploadedVoice = null; // name the server gave an uploaded sample
let serverLimits = {};
let serverInfo = {};
let lastTextAt = 0;
let latencyEstimate = null;
let statsTimer = null;

// ---------------------------------------------------------------------------------------------------------------
// Notices

function notify(id, text, level = "error") {
  let notice = document.querySelector(`[data-notice="${id}"]`);
  if (!notice) {
    notice = document.createElement("p");
    notice.dataset.notice = id;
    $("notices").append(notice);
  }
  notice.className = `notice ${level}`;
  notice.textContent = text;
  const notices = [...document.querySelectorAll("[data-notice]")];
  debug.notices = notices.map((notice) => ({ id: notice.dataset.notice, text: notice.textContent }));
}

// The demo model babbles by design: a visitor must not take that for a broken server.
const DEMO_MODEL_TEXT =
  "This server runs the built-in demo model: random, untrained weights. It answers with noise, not words; " +
  "start the server without --model demo to talk to PersonaPlex.";

function showModelNotice(info) {
  if (info?.untrained === true) notify("demo-model", DEMO_MODEL_TEXT, "info");
}

async function checkServerModel() {
  try {
    const response = await fetch("api/health", { cache: "no-store" });
    if (response.ok) showModelNotice(await response.json());
  } catch {
    // a server without /api/health (the reference server) says nothing about its model here
  }
}

function clearNotice(id) {
  document.querySelector(`[data-notice="${id}"]`)?.remove();
  debug.notices = debug.notices.filter((notice) => notice.id !== id);
}

// ---------------------------------------------------------------------------------------------------------------
// Environment checks: secure context, microphone permission, audio APIs

function environmentProblems() {
  const problems = [];
  if (!window.isSecureContext) {
    problems.push({
      id: "insecure",
      text:
        "This page is not in a secure context, so the browser will not give it the microphone. Open it over " +
        "https (start the server with --ssl DIR) or on this machine as http://localhost.",
    });
    return problems; // the APIs below are hidden outside secure contexts anyway
  }
  if (!navigator.mediaDevices?.getUserMedia) {
    problems.push({ id: "no-mic-api", text: "This browser cannot capture audio (no navigator.mediaDevices)." });
  }
  if (typeof AudioWorkletNode === "undefined") {
    problems.push({ id: "no-worklet", text: "This browser lacks AudioWorklet; use a current Chromium or Firefox." });
  }
  if (typeof AudioEncoder === "undefined" || !canDecodeOpus()) {
    problems.push({
      id: "no-webcodecs",
      text: "This browser lacks WebCodecs audio (AudioEncoder/AudioDecoder); use Chromium 94+ or Firefox 130+.",
    });
  }
  return problems;
}

async function watchMicrophonePermission() {
  try {
    const status = await navigator.permissions.query({ name: "microphone" });
    const show = () => {
      if (status.state === "denied") {
        showMicrophoneBlocked();
      } else {
        delete document.body.dataset.mic;
        clearNotice("mic-blocked");
      }
    };
    show();
    status.onchange = show;
  } catch {
    // Some browsers cannot query the microphone permission; getUserMedia's error tells instead.
  }
}

function showMicrophoneBlocked() {
  document.body.dataset.mic = "blocked";
  notify(
    "mic-blocked",
    "The microphone is blocked for this page. Allow it in the browser's site settings (the icon left of the " +
      "address), then press Start again.",
  );
}

function microphoneErrorText(error) {
  switch (error.name) {
    case "NotAllowedError":
    case "SecurityError":
      return null; // shown as the blocked-microphone notice
    case "NotFoundError":
    case "OverconstrainedError":
      return "No microphone was found. Connect one and press Start again.";
    case "NotReadableError":
      return "The microphone is in use by another program or cannot be opened.";
    default:
      return `The microphone could not be opened: ${error.message || error.name}`;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Persona panel

function fillExamples() {
  for (const persona of EXAMPLE_PERSONAS) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "secondary";
    button.textContent = persona.label;
    button.addEventListener("click", () => {
      $("prompt").value = persona.prompt;
      updatePromptCount();
      saveSettings();
    });
    $("examples").append(button);
  }
}

function updatePromptCount() {
  $("prompt-count").textContent = `${$("prompt").value.length}/${MAX_PROMPT_CHARS}`;
}

function fillVoices(names, preferences) {
  const select = $("voice");
  select.replaceChildren();
  for (const name of names) select.append(new Option(voiceLabel(name), name));
  const selected = preferences.find((name) => name && names.includes(name));
  if (selected) select.value = selected;
}

async function refreshVoices() {
  const settings = loadSettings();
  const result = await loadVoices(tokenValue());
  debug.voices = result.voices;
  clearNotice("voices");
  clearNotice("auth");
  const note = $("voice-note");
  note.hidden = true;
  if (result.status === "unauthorized") {
    $("access").open = true;
    notify("auth", "This server needs an access token: enter it under Access, then reload or press Start.");
  }
  if (result.voices.length > 0) {
    fillVoices(result.voices, [settings.voice_prompt, result.defaultVoice]);
  } else {
    fillVoices(REFERENCE_VOICES, [settings.voice_prompt, "NATF0.pt"]);
    if (result.status === "unavailable") {
      note.textContent = "This server does not list its voices; showing the usual preset names.";
      note.hidden = false;
    }
  }
  $("upload-group").hidden = !result.uploadAllowed;
  $("upload-note").textContent = result.uploadAllowed && result.maxUploadBytes
    ? `Up to ${(result.maxUploadBytes / 1048576).toFixed(0)} MiB. A chosen file replaces the preset voice.`
    : "A chosen file replaces the preset voice; a few seconds of clear speech work best.";
}

function tokenValue() {
  return $("token").value.trim();
}

function loadSettings() {
  try {
    return JSON.parse(localStorage.getItem(SETTINGS_KEY)) || {};
  } catch {
    return {};
  }
}

function saveSettings() {
  const settings = { text_prompt: $("prompt").value, voice_prompt: $("voice").value };
  for (const [name, id] of Object.entries(SAMPLING_FIELDS)) settings[name] = $(id).value;
  try {
    localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings));
  } catch {
    // storage may be disabled (private windows): settings then last for this page only
  }
}

function restoreSettings() {
  const settings = loadSettings();
  $("prompt").value = settings.text_prompt ?? DEFAULT_PROMPT;
  for (const [name, id] of Object.entries(SAMPLING_FIELDS)) {
    if (settings[name] !== undefined) $(id).value = settings[name];
  }
  const pageToken = new URLSearchParams(location.search).get("token");
  if (pageToken) $("token").value = pageToken;
  updatePromptCount();
}

// ---------------------------------------------------------------------------------------------------------------
// Connection

function chatUrl() {
  const page = new URLSearchParams(location.search);
  // ?worker_addr=HOST:PORT talks to another server than the one serving the page (as the reference client).
  const workerAddress = page.get("worker_addr");
  // Relative to the page, so that a server behind a reverse proxy at /some/path/ works too.
  const url = new URL("api/chat", location.href);
  if (workerAddress && workerAddress !== "same") {
    url.host = workerAddress;
    url.pathname = "/api/chat";
  }
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const params = new URLSearchParams();
  params.set("text_temperature", $("text-temperature").value);
  params.set("text_topk", $("text-topk").value);
  params.set("audio_temperature", $("audio-temperature").value);
  params.set("audio_topk", $("audio-topk").value);
  const seed = Number($("seed").value);
  if (Number.isInteger(seed) && seed >= 0) params.set("seed", String(seed)); // -1: let the server pick
  params.set("text_prompt", $("prompt").value);
  params.set("voice_prompt", uploadedVoice ?? $("voice").value);
  const token = tokenValue();
  if (token) params.set("token", token);
  url.search = params.toString();
  url.hash = "";
  return url.toString();
}

async function startConversation(event) {
  event.preventDefault();
  if (session) return;
  let encoderConfig = null;
  const form = $("persona-form");
  if (!form.checkValidity()) {
    $("sampling").open = true;
    form.reportValidity();
    return;
  }
  saveSettings();
  for (const id of ["connection", "server-error", "mic", "upload", "behind"]) clearNotice(id);
  setBusy(true);
  setStatus("starting", "Starting audio…");
  try {
    // Audio starts inside the click (browsers allow sound only from a user gesture), before any waiting.
    audioContext = new AudioContext({ latencyHint: "interactive" });
    const audioStarted = startAudioOutput(audioContext);
    audioStarted.catch(() => {}); // handled by the await below, after the upload
    await prepareUpload();
    await audioStarted;
    await audioContext.audioWorklet.addModule(new URL("./worklets/capture-worklet.js", import.meta.url));
    await audioContext.audioWorklet.addModule(new URL("./worklets/playback-worklet.js", import.meta.url));
    encoderConfig = await chooseEncoderConfig();
    if (!encoderConfig) {
      throw new Error("this browser cannot encode Opus with WebCodecs; use a current Chromium or Firefox");
    }
    microphone = await openMicrophone();
    if (!microphone) {
      await endLocally();
      return;
    }
  } catch (error) {
    notify("connection", `Could not start: ${error.message}`);
    await endLocally();
    return;
  }
  beginSession(audioContext, microphone, encoderConfig);
}

// A browser with no usable audio output never resolves resume(): say so instead of hanging.
async function startAudioOutput(context) {
  const timeout = new Promise((resolve) => setTimeout(resolve, AUDIO_START_TIMEOUT_MS));
  await Promise.race([context.resume(), timeout]);
  if (context.state !== "running") {
    throw new Error("the browser could not start audio output; check that a speaker or headset is available");
  }
}

async function openMicrophone() {
  try {
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
    delete document.body.dataset.mic;
    clearNotice("mic-blocked");
    return stream;
  } catch (error) {
    const text = microphoneErrorText(error);
    if (text) notify("mic", text);
    else showMicrophoneBlocked();
    return null;
  }
}

async function prepareUpload() {
  uploadedVoice = null;
  const file = $("voice-file").files?.[0];
  if ($("upload-group").hidden || !file) return;
  setStatus("starting", "Uploading the voice sample…");
  uploadedVoice = await uploadVoice(file, tokenValue());
}

function beginSession(context, stream, encoderConfig) {
  $("transcript").replaceChildren();
  for (const value of document.querySelectorAll("[data-stat]")) value.textContent = "–";
  $("server-info").replaceChildren();
  $("server-panel").hidden = true;
  debug.metadata = [];
  debug.serverErrors = [];
  debug.stats = { playback: null, microphone: null };
  serverLimits = {};
  serverInfo = {};
  latencyEstimate = null;
  lastTextAt = 0;
  transcriptDecoder = new TextDecoder("utf-8");
  session = new ChatSession(
    { url: chatUrl(), context, microphone: stream, encoderConfig },
    {
      onState: onSessionState,
      onText: appendTranscript,
      onMetadata: showMetadata,
      onServerError: (text) => {
        debug.serverErrors.push(text);
        const started = session?.handshakeAt > 0;
        notify("server-error", `The server ${started ? "ended" : "refused"} the conversation: ${text}`);
      },
      onStats: (stats) => Object.assign(debug.stats, stats),
      onClosed: onSessionClosed,
    },
  );
  debug.counters = session.counters;
  session.start();
  // On narrow screens the conversation sits below the persona form: bring it into view.
  if (window.matchMedia("(max-width: 800px)").matches) $("conversation-heading").scrollIntoView({ block: "start" });
  statsTimer = setInterval(renderStats, 200);
}

function onSessionState(state, detail) {
  debug.state = state;
  if (state === "connecting") setStatus(state, "Connecting…");
  else if (state === "preparing") setStatus(state, "Preparing the persona…");
  else if (state === "connected") {
    setStatus(state, "Connected: speak any time");
    document.querySelector('[data-stat="handshake"]').textContent = `${Math.round(detail.handshakeMs)} ms`;
  } else if (state === "closing") setStatus(state, "Ending…");
}

function onSessionClosed({ code, serverError, localError, wasConnected }) {
  debug.sentSeconds = session.sentSeconds; // the whole microphone stream, final packet included
  if (localError) notify("connection", localError);
  else if (!serverError && code !== 1000 && code !== 1001) {
    notify(
      "connection",
      wasConnected
        ? `The connection was lost (code ${code}).`
        : `Could not connect to the server (code ${code}). Check that it is running and reachable.`,
    );
  }
  const closed = session;
  session = null;
  renderStats();
  const text = serverError ? "Ended by the server" : wasConnected ? "Conversation ended" : "Not connected";
  const failed = Boolean(serverError || localError) || (code !== 1000 && code !== 1001);
  setStatus(failed ? "failed" : "closed", text);
  debug.state = "closed";
  microphone?.getTracks().forEach((track) => track.stop()); // the microphone is off at once, not after the drain
  closed.drainPlayback().then(endLocally);
}

async function endLocally() {
  clearInterval(statsTimer);
  microphone?.getTracks().forEach((track) => track.stop());
  microphone = null;
  if (audioContext && audioContext.state !== "closed") await audioContext.close();
  audioContext = null;
  setBusy(false);
  if (debug.state === "idle" || debug.state === "starting") setStatus("idle", "Not connected");
}

async function stopConversation() {
  $("stop").disabled = true;
  await session?.stop();
}

function setBusy(busy) {
  $("start").disabled = busy;
  $("stop").disabled = !busy;
  const controls = $("persona-form").querySelectorAll("textarea, select, input, .examples button, #reset-sampling");
  for (const element of controls) element.disabled = busy;
}

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status-text").textContent = text;
  if (state === "starting") debug.state = state;
}

// ---------------------------------------------------------------------------------------------------------------
// Transcript, metadata, stats

// Pieces like "<0xE2>" are SentencePiece byte fallbacks: runs of them form UTF-8 characters.
const BYTE_PIECE = /^<0x([0-9A-Fa-f]{2})>$/;
let transcriptDecoder = new TextDecoder("utf-8");
const CONTROL_CHARACTERS = /[\u0000-\u0008\u000b-\u001f\u007f]/g; // byte pieces can spell them; they show as junk

function appendTranscript(piece) {
  const byte = BYTE_PIECE.exec(piece);
  let text;
  if (byte) {
    text = transcriptDecoder.decode(new Uint8Array([parseInt(byte[1], 16)]), { stream: true });
  } else {
    text = transcriptDecoder.decode() + piece; // flush an unfinished byte sequence (as U+FFFD)
  }
  text = text.replace(CONTROL_CHARACTERS, "");
  if (!text) return;
  const transcript = $("transcript");
  const now = performance.now();
  let paragraph = transcript.lastElementChild;
  if (!paragraph || now - lastTextAt > TRANSCRIPT_PAUSE_MS) {
    paragraph = document.createElement("p");
    transcript.append(paragraph);
  }
  lastTextAt = now;
  paragraph.append(document.createTextNode(text));
  transcript.scrollTop = transcript.scrollHeight;
}

function queuePosition(metadata) {
  const value = metadata.queue_position ?? metadata.queue?.position;
  return Number.isInteger(value) ? value : null;
}

// What the server-info panel shows, from the metadata fields this server sends (and the reference-style
// fields other servers send); anything else in the metadata is kept in window.personaplex.metadata only.
const SERVER_INFO_ROWS = [
  ["Model", (m) => {
    if (m.model === undefined) return m.lm_model_file; // the reference-style field
    return m.untrained ? `${m.model} (untrained demo weights)` : m.model;
  }],
  ["Voice", (m) => m.persona?.voice],
  ["Seed", (m) => (m.persona?.seed === undefined ? undefined : m.persona.seed ?? "random")],
  ["Text sampling", (m) => sampling(m.text_temperature, m.text_topk)],
  ["Audio sampling", (m) => sampling(m.audio_temperature, m.audio_topk)],
  ["Slots busy on arrival", (m) => {
    if (m.slots_busy === undefined) return undefined;
    return `${m.slots_busy} of ${m.limits?.slots ?? m.slots_busy + m.slots_free}`;
  }],
  ["Waiting", (m) => {
    if (m.queued === undefined) return undefined;
    return m.limits?.max_queue === undefined ? `${m.queued}` : `${m.queued} (at most ${m.limits.max_queue})`;
  }],
  ["Longest conversation", (m) => (maxConversationSeconds(m) ? formatSeconds(maxConversationSeconds(m)) : undefined)],
  ["Conversation", (m) => {
    if (m.conversation_id === undefined) return undefined;
    return `${m.conversation_id} (slot ${m.slot}${m.cached_persona ? ", persona from cache" : ""})`;
  }],
];

function sampling(temperature, topK) {
  return temperature === undefined ? undefined : `temperature ${temperature}, top-k ${topK}`;
}

function maxConversationSeconds(metadata) {
  const value = metadata.max_conversation_seconds ?? metadata.limits?.max_conversation_seconds;
  return typeof value === "number" && value > 0 ? value : null;
}

function showMetadata(metadata) {
  debug.metadata.push(metadata);
  const position = queuePosition(metadata);
  if (position !== null && session && session.state !== "connected") {
    setStatus("waiting", position > 0 ? `Waiting, position ${position}` : "Joining…");
  }
  serverInfo = { ...serverInfo, ...metadata };
  showModelNotice(metadata);
  serverLimits.maxSeconds = maxConversationSeconds(serverInfo);
  const info = $("server-info");
  info.replaceChildren();
  for (const [label, read] of SERVER_INFO_ROWS) {
    const value = read(serverInfo);
    if (value === undefined || value === null || value === "") continue;
    const term = document.createElement("dt");
    term.textContent = label;
    const detail = document.createElement("dd");
    detail.textContent = String(value);
    info.append(term, detail);
  }
  $("server-panel").hidden = info.childElementCount === 0;
}

/** Peak amplitude -> 0..1 on a -60..0 dBFS scale, which is how loudness is perceived. */
function meterLevel(peak) {
  if (!(peak > 0)) return 0;
  return Math.max(0, Math.min(1, 1 + (20 * Math.log10(peak)) / 60));
}

function formatSeconds(seconds) {
  const minutes = Math.floor(seconds / 60);
  return `${minutes}:${(seconds - minutes * 60).toFixed(1).padStart(4, "0")}`;
}

// Past these, the conversation no longer feels live: say so (once per conversation, kept up to date).
const BEHIND_LATENCY_SECONDS = 1.5;
const BEHIND_UNDERRUNS = 5;

/** A notice when the server falls behind real time: the round trip grows, or the agent's audio keeps running dry. */
function watchRealTime(playback) {
  const latency = latencyEstimate ?? 0;
  const underruns = playback.underruns ?? 0;
  if (!session || (latency < BEHIND_LATENCY_SECONDS && underruns < BEHIND_UNDERRUNS)) return;
  notify(
    "behind",
    `The server is falling behind real time: replies arrive about ${latency.toFixed(1)} s after you speak and the ` +
      `agent's audio ran dry ${underruns} time${underruns === 1 ? "" : "s"}. It may be overloaded (too many ` +
      "conversations, or a model too large for its hardware).",
    "warning",
  );
}

function renderStats() {
  const stat = (name, text) => {
    document.querySelector(`[data-stat="${name}"]`).textContent = text;
  };
  const playback = debug.stats.playback;
  const mic = debug.stats.microphone;
  $("mic-level").value = session && mic ? meterLevel(mic.peak) : 0;
  $("agent-level").value = session && playback ? meterLevel(playback.peak) : 0;
  const sent = session ? session.sentSeconds : null;
  if (sent !== null) stat("sent", formatSeconds(sent));
  if (!playback) return;
  stat("buffer", `${Math.round(playback.bufferedMs)} ms (target ${Math.round(playback.targetMs)}, ` +
    `range ${Math.round(playback.minBufferedMs)}–${Math.round(playback.maxBufferedMs)})`);
  stat("played", formatSeconds(playback.playedSeconds));
  stat("missed", `${formatSeconds(playback.missedSeconds)} (${playback.underruns} underruns)`);
  stat("dropped", formatSeconds(playback.droppedSeconds));
  if (sent !== null && playback.playedSeconds > 0) {
    // Every input frame yields one output frame, so microphone time sent minus agent time played is the
    // round trip: network both ways, server processing and the jitter buffer.
    // Dropped audio (after a burst) moved the agent's timeline on as if it had played.
    const sample = Math.max(0, sent - playback.playedSeconds - playback.droppedSeconds);
    latencyEstimate = latencyEstimate === null ? sample : 0.85 * latencyEstimate + 0.15 * sample;
    stat("latency", `${Math.round(latencyEstimate * 1000)} ms`);
    debug.stats.latencySeconds = latencyEstimate;
  }
  watchRealTime(playback);
  if (serverLimits.maxSeconds && session?.handshakeAt) {
    const left = serverLimits.maxSeconds - (performance.now() - session.handshakeAt) / 1000;
    stat("remaining", formatSeconds(Math.max(0, left)));
  }
}

// ---------------------------------------------------------------------------------------------------------------

function init() {
  fillExamples();
  restoreSettings();
  $("prompt").addEventListener("input", () => {
    updatePromptCount();
    saveSettings();
  });
  $("voice").addEventListener("change", saveSettings);
  $("reset-sampling").addEventListener("click", () => {
    for (const [name, id] of Object.entries(SAMPLING_FIELDS)) $(id).value = SAMPLING_DEFAULTS[name];
    saveSettings();
  });
  $("token").addEventListener("change", refreshVoices);
  $("persona-form").addEventListener("submit", startConversation);
  $("stop").addEventListener("click", stopConversation);
  const problems = environmentProblems();
  for (const problem of problems) notify(problem.id, problem.text);
  if (problems.length > 0) {
    document.body.dataset.unsupported = problems.map((problem) => problem.id).join(" ");
    $("start").disabled = true;
  } else {
    watchMicrophonePermission();
  }
  Promise.allSettled([refreshVoices(), checkServerModel()]).finally(() => {
    document.body.dataset.ready = "true";
  });
}

init();
