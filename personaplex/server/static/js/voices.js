// The server's voice presets (GET /api/voices) and, where the server allows it, uploaded voice samples.

function authHeaders(token) {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

/**
 * The voice list, whether uploads are allowed, and the default voice. Status "unavailable": the server has no
 * voice list (the reference server has none); "unauthorized": it wants an access token.
 * @param {string} token access token, or "" when none
 * @returns {Promise<{status:"ok"|"unauthorized"|"unavailable", voices:string[], defaultVoice:string|null,
 *   uploadAllowed:boolean, maxUploadBytes:number|null}>}
 */
export async function loadVoices(token) {
  const result = {
    status: "unavailable", voices: [], defaultVoice: null, uploadAllowed: false, maxUploadBytes: null,
  };
  let response;
  try {
    response = await fetch("api/voices", { headers: authHeaders(token), cache: "no-store" });
  } catch {
    return result;
  }
  if (response.status === 401 || response.status === 403) return { ...result, status: "unauthorized" };
  if (!response.ok || !(response.headers.get("content-type") || "").includes("json")) return result;
  let body;
  try {
    body = await response.json();
  } catch {
    return result;
  }
  const list = Array.isArray(body) ? body : body.voices;
  if (!Array.isArray(list)) return result;
  result.status = "ok";
  result.voices = list
    .map((voice) => (typeof voice === "string" ? voice : voice?.name))
    .filter((name) => typeof name === "string" && name.length > 0);
  if (!Array.isArray(body)) {
    if (typeof body.default === "string") result.defaultVoice = body.default;
    const upload = body.upload ?? body.voice_upload;
    result.uploadAllowed = upload === true || Boolean(upload?.allowed);
    result.maxUploadBytes = upload?.max_bytes ?? body.max_voice_upload_bytes ?? null;
  }
  return result;
}

/**
 * Sends a voice sample to the server (POST /api/voices, raw file bytes as the body).
 * @returns {Promise<string>} the voice name to pass as voice_prompt
 * @throws {Error} with the server's explanation when it refuses the sample
 */
export async function uploadVoice(file, token) {
  let response;
  try {
    response = await fetch("api/voices", {
      method: "POST",
      headers: { "Content-Type": file.type || "application/octet-stream", ...authHeaders(token) },
      body: file,
    });
  } catch (error) {
    throw new Error(`the voice sample could not be sent (${error.message})`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    // a proxy's HTML error page: the status says enough
  }
  if (!response.ok) {
    const reason = body?.error || `HTTP ${response.status}`;
    throw new Error(`the server refused the voice sample: ${reason}`);
  }
  if (typeof body?.voice !== "string") throw new Error("the server did not name the uploaded voice");
  return body.voice;
}
