// The browser softphone: WebRTC to the gateway (POST /api/offer), events over the data channel.
// Plain JS, no build step, nothing fetched from elsewhere. State and measurements are on
// window.softphone (state, callId, endReason, error, stats) for the curious and for tests.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    persona: $("persona"), status: $("status"), statusText: $("status-text"), timer: $("timer"),
    call: $("call"), message: $("message"), mic: $("mic-level"), bot: $("bot-level"),
    transcript: $("transcript"), audio: $("bot-audio"),
  };

  const END_MESSAGES = {
    caller_hangup: null,
    max_duration: "The call reached its time limit.",
    transfer: "The call was transferred.",
    worker_lost: "The call was lost: the voice engine stopped responding. Please call again.",
    busy: "All lines are busy right now. Please try again in a minute.",
    error: "The call ended because of a technical problem. Please call again.",
  };
  const METER_MS = 50;
  const STATS_MS = 1000;
  const ICE_GATHER_MS = 2000;
  const MAX_TRANSCRIPT = 4000;
  const SILENT_RMS = 1e-4;

  const newStats = () => ({
    micPeak: 0, micActiveTicks: 0, botPeak: 0, botActiveTicks: 0, meterTicks: 0,
    texts: 0, textChars: 0, packetsReceived: 0, bytesReceived: 0, totalSamplesReceived: 0, audioLevel: 0,
  });
  const phone = { state: "idle", callId: null, persona: null, endReason: null, error: null, stats: newStats() };
  window.softphone = phone;

  let call = null;       // the call in progress: {seq, pc, channel, mic, micMeter, botMeter, timers}
  let seq = 0;           // a newer call (or a hang-up) makes an older call's callbacks no-ops
  let audioCtx = null;
  let iceServers = [];   // STUN/TURN from the gateway (WEBRTC_ICE_SERVERS)

  // ------------------------------------------------------------------ UI
  function setState(state, text) {
    phone.state = state;
    ui.status.dataset.state = state;
    ui.statusText.textContent = text;
    const inCall = state === "connecting" || state === "active";
    ui.call.textContent = inCall ? "Hang up" : "Call";
    ui.call.classList.toggle("hangup", inCall);
    ui.call.disabled = ui.persona.options.length === 0;
    ui.persona.disabled = inCall || ui.persona.options.length === 0;
  }

  function showMessage(text) {
    ui.message.textContent = text;
    ui.message.hidden = !text;
  }

  function appendText(text) {
    phone.stats.texts += 1;
    phone.stats.textChars += text.length;
    const all = ui.transcript.textContent + text;
    ui.transcript.textContent = all.length > MAX_TRANSCRIPT ? all.slice(-MAX_TRANSCRIPT) : all;
    ui.transcript.scrollTop = ui.transcript.scrollHeight;
  }

  function showLevel(bar, rms) {
    const db = rms > 0 ? 20 * Math.log10(rms) : -100;
    const pct = Math.max(0, Math.min(100, ((db + 60) / 60) * 100));
    bar.style.width = `${pct.toFixed(0)}%`;
  }

  function clock(ms) {
    const s = Math.floor(ms / 1000);
    return `${String(Math.floor(s / 60)).padStart(2, "0")}:${String(s % 60).padStart(2, "0")}`;
  }

  // ------------------------------------------------------------------ audio meters
  function meter(stream) {
    const source = audioCtx.createMediaStreamSource(stream);
    const analyser = audioCtx.createAnalyser();
    analyser.fftSize = 1024;
    source.connect(analyser);
    return { source, analyser, buf: new Float32Array(analyser.fftSize) };
  }

  function rms(m) {
    if (!m) return 0;
    m.analyser.getFloatTimeDomainData(m.buf);
    let sum = 0;
    for (const x of m.buf) sum += x * x;
    return Math.sqrt(sum / m.buf.length);
  }

  function tickMeters(c) {
    const s = phone.stats;
    const mic = rms(c.micMeter);
    const bot = rms(c.botMeter);
    s.meterTicks += 1;
    s.micPeak = Math.max(s.micPeak, mic);
    s.botPeak = Math.max(s.botPeak, bot);
    if (mic > SILENT_RMS) s.micActiveTicks += 1;
    if (bot > SILENT_RMS) s.botActiveTicks += 1;
    showLevel(ui.mic, mic);
    showLevel(ui.bot, bot);
    if (c.activeAt) ui.timer.textContent = clock(performance.now() - c.activeAt);
  }

  async function readStats(c) {
    const reports = await c.pc.getStats();
    reports.forEach((r) => {
      if (r.type === "inbound-rtp" && r.kind === "audio") {
        const s = phone.stats;
        s.packetsReceived = r.packetsReceived || 0;
        s.bytesReceived = r.bytesReceived || 0;
        s.totalSamplesReceived = r.totalSamplesReceived || 0;
        s.audioLevel = r.audioLevel || 0;
      }
    });
  }

  // ------------------------------------------------------------------ a call
  function micProblem(err) {
    switch (err && err.name) {
      case "NotAllowedError":
      case "SecurityError":
        return "Microphone access was refused. Allow the microphone for this page and call again.";
      case "NotFoundError":
      case "OverconstrainedError":
        return "No microphone was found. Connect one and call again.";
      case "NotReadableError":
        return "The microphone is busy in another application.";
      default:
        return `The microphone could not be opened (${err && err.name ? err.name : err}).`;
    }
  }

  function gathered(pc) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => { clearTimeout(timer); pc.removeEventListener("icegatheringstatechange", check); resolve(); };
      const check = () => { if (pc.iceGatheringState === "complete") done(); };
      const timer = setTimeout(done, ICE_GATHER_MS);  // send what we have: host candidates come first
      pc.addEventListener("icegatheringstatechange", check);
    });
  }

  function teardown(c, closeDelayMs = 0) {
    if (!c) return;
    if (call === c) call = null;
    clearInterval(c.meterTimer);
    clearInterval(c.statsTimer);
    for (const m of [c.micMeter, c.botMeter]) if (m) m.source.disconnect();
    if (c.mic) c.mic.getTracks().forEach((t) => t.stop());
    showLevel(ui.mic, 0);
    showLevel(ui.bot, 0);
    ui.audio.srcObject = null;
    const close = () => c.pc && c.pc.close();
    if (closeDelayMs > 0) setTimeout(close, closeDelayMs); else close();
  }

  function showEnded(c) {
    ui.timer.textContent = clock(c.activeAt ? performance.now() - c.activeAt : 0);  // the call's length
    setState("ended", "Call ended");
  }

  function fail(c, code, text) {
    if (c && c.seq !== seq) return;
    phone.error = code;
    teardown(c);
    seq += 1;
    setState("error", "Not connected");
    showMessage(text);
  }

  function ended(c, reason) {
    if (c.seq !== seq) return;
    phone.endReason = reason;
    teardown(c);
    seq += 1;
    showEnded(c);
    const text = reason in END_MESSAGES ? END_MESSAGES[reason] : "The call ended.";
    if (text) showMessage(text);
  }

  function onServerMessage(c, data) {
    if (c.seq !== seq) return;
    let msg;
    try {
      msg = JSON.parse(data);
    } catch (err) {
      console.warn("softphone: ignoring a message that is not JSON", err);
      return;
    }
    if (msg.type === "status" && msg.status === "active" && !c.activeAt) {
      c.activeAt = performance.now();
      setState("active", `On the line with ${phone.persona.name}`);
    } else if (msg.type === "text" && typeof msg.text === "string") {
      appendText(msg.text);
    } else if (msg.type === "ended") {
      ended(c, msg.reason);
    } else if (msg.type === "signalling" && msg.message && msg.message.type === "peerLeft") {
      ended(c, phone.endReason || "server_left");
    }
  }

  function onBotTrack(c, ev) {
    if (c.seq !== seq) return;
    const stream = ev.streams && ev.streams[0] ? ev.streams[0] : new MediaStream([ev.track]);
    ui.audio.srcObject = stream;  // Chrome feeds Web Audio from a remote track only while it plays
    ui.audio.play().catch((err) => console.warn("softphone: the bot's audio cannot autoplay", err));
    c.botMeter = meter(stream);
  }

  async function startCall() {
    const c = { seq: ++seq, pc: null, channel: null, mic: null, micMeter: null, botMeter: null, activeAt: 0 };
    call = c;
    Object.assign(phone, { callId: null, endReason: null, error: null, stats: newStats() });
    phone.persona = { id: ui.persona.value, name: ui.persona.selectedOptions[0].textContent };
    showMessage("");
    ui.transcript.textContent = "";
    ui.timer.textContent = clock(0);
    if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      fail(c, "insecure", "The microphone needs a secure page: open the softphone over HTTPS (or on localhost).");
      return;
    }
    setState("connecting", "Opening the microphone…");
    audioCtx = audioCtx || new (window.AudioContext || window.webkitAudioContext)();  // made on the click
    audioCtx.resume();
    try {
      c.mic = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      });
    } catch (err) {
      fail(c, "no_microphone", micProblem(err));
      return;
    }
    if (c.seq !== seq) { c.mic.getTracks().forEach((t) => t.stop()); return; }
    c.micMeter = meter(c.mic);
    c.meterTimer = setInterval(() => tickMeters(c), METER_MS);

    setState("connecting", `Calling ${phone.persona.name}…`);
    const pc = new RTCPeerConnection({ iceServers: iceServers, bundlePolicy: "max-bundle" });
    c.pc = pc;
    c.channel = pc.createDataChannel("events", { ordered: true });
    c.channel.onmessage = (ev) => onServerMessage(c, ev.data);
    pc.addTransceiver(c.mic.getAudioTracks()[0], { direction: "sendrecv", streams: [c.mic] });
    pc.ontrack = (ev) => onBotTrack(c, ev);
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "failed") fail(c, "connection_failed", "The connection to the server was lost.");
    };
    c.statsTimer = setInterval(() => readStats(c).catch((err) => console.warn("softphone: getStats", err)), STATS_MS);

    let response;
    let body = {};
    try {
      await pc.setLocalDescription(await pc.createOffer());
      await gathered(pc);
      if (c.seq !== seq) return;
      response = await fetch("/api/offer", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer", persona: phone.persona.id }),
      });
      body = await response.json().catch(() => ({}));
    } catch (err) {
      fail(c, "unreachable", `The call could not be placed: ${err.message || err}`);
      return;
    }
    if (c.seq !== seq) return;
    if (!response.ok) {
      const code = body.error || `http_${response.status}`;
      const text = code === "busy" ? END_MESSAGES.busy : body.message || `The call could not start (HTTP ${response.status}).`;
      fail(c, code, text);
      return;
    }
    phone.callId = body.call_id;
    try {
      await pc.setRemoteDescription({ type: body.type, sdp: body.sdp });
    } catch (err) {
      fail(c, "bad_answer", `The server's answer could not be used: ${err.message || err}`);
      return;
    }
    if (c.seq === seq && !c.activeAt) setState("connecting", `Connecting to ${body.persona.name}…`);
  }

  function hangUp() {
    const c = call;
    if (!c) return;
    phone.endReason = "caller_hangup";
    if (c.channel && c.channel.readyState === "open") c.channel.send(JSON.stringify({ type: "hangup" }));
    teardown(c, 200);  // let the data channel carry the hang-up before the connection closes
    seq += 1;
    showEnded(c);
  }

  // ------------------------------------------------------------------ start-up
  async function loadPersonas() {
    try {
      const response = await fetch("/api/personas");
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const body = await response.json();
      iceServers = body.ice_servers || [];
      ui.persona.replaceChildren(...body.personas.map((p) => new Option(p.name, p.id, false, p.id === body.default)));
      ui.persona.disabled = false;
      setState("idle", "Ready");
    } catch (err) {
      ui.persona.replaceChildren();
      setState("error", "Not available");
      showMessage(`The personas could not be loaded (${err.message || err}). Reload the page to try again.`);
    }
  }

  ui.call.addEventListener("click", () => {
    if (phone.state === "connecting" || phone.state === "active") hangUp();
    else startCall().catch((err) => fail(call, "error", `The call failed: ${err.message || err}`));
  });
  window.addEventListener("pagehide", () => { if (call) hangUp(); });
  loadPersonas();
})();
