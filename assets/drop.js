// Drop a PNG made by Clair (or AUTOMATIC1111) on the Image tab: its settings fill the fields.
// Read here, in the browser: Clair takes no uploads, so the file never leaves this machine.
// Clair writes a `clair` text chunk (JSON) and an A1111 `parameters` chunk; either is enough.
(() => {
  if (window.__clairDrop) return;
  window.__clairDrop = true;

  const latin1 = new TextDecoder("latin1");
  const utf8 = new TextDecoder("utf-8");

  // A compressed text chunk inflates to at most this many bytes: Clair's and A1111's settings take a few
  // kilobytes, and a 1 MB chunk of zeros would otherwise inflate to gigabytes in the browser.
  const MAX_INFLATED = 256 * 1024;

  async function inflate(bytes, limit = MAX_INFLATED) {
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    const reader = stream.getReader();
    const parts = [];
    let size = 0;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      size += value.length;
      if (size > limit) {
        await reader.cancel();
        throw new Error("text chunk too large");
      }
      parts.push(value);
    }
    const out = new Uint8Array(size);
    let at = 0;
    for (const p of parts) { out.set(p, at); at += p.length; }
    return out;
  }

  // The text chunks of a PNG: {keyword: text}. tEXt, zTXt and iTXt, stopping at the image data's end.
  async function pngText(buffer) {
    const b = new Uint8Array(buffer);
    const sig = [137, 80, 78, 71, 13, 10, 26, 10];
    if (b.length < 8 || sig.some((v, i) => b[i] !== v)) return null;
    const view = new DataView(buffer);
    const out = {};
    let at = 8;
    while (at + 12 <= b.length) {
      const len = view.getUint32(at);
      const type = latin1.decode(b.subarray(at + 4, at + 8));
      const data = b.subarray(at + 8, at + 8 + len);
      at += 12 + len;
      if (type === "IEND") break;
      const nul = data.indexOf(0);
      if (nul < 0) continue;
      const key = latin1.decode(data.subarray(0, nul));
      try {
        if (type === "tEXt") out[key] = latin1.decode(data.subarray(nul + 1));
        else if (type === "zTXt") out[key] = latin1.decode(await inflate(data.subarray(nul + 2)));
        else if (type === "iTXt") {
          const compressed = data[nul + 1] === 1;
          let p = nul + 3;
          p = data.indexOf(0, p) + 1; // language tag
          p = data.indexOf(0, p) + 1; // translated keyword
          const text = data.subarray(p);
          out[key] = utf8.decode(compressed ? await inflate(text) : text);
        }
      } catch (e) { /* a damaged chunk: skip it */ }
    }
    return out;
  }
  window.__clairPngText = pngText; // for tests/test_browser.py

  // AUTOMATIC1111's `parameters`: prompt lines, "Negative prompt: ...", then "Steps: 30, ..., Size: WxH".
  function fromA1111(text) {
    const lines = text.split("\n");
    const last = lines.pop() || "";
    const neg = lines.findIndex((l) => l.startsWith("Negative prompt:"));
    const prompt = (neg < 0 ? lines : lines.slice(0, neg)).join("\n");
    const negative = neg < 0 ? "" : lines.slice(neg).join("\n").replace(/^Negative prompt:\s*/, "");
    const field = (name) => (last.match(new RegExp(name + ":\\s*([^,]+)")) || [])[1];
    const size = (field("Size") || "").split("x");
    return {
      prompt, negative_prompt: negative, steps: field("Steps"), guidance: field("CFG scale"),
      seed: field("Seed"), width: size[0], height: size[1],
    };
  }

  function settingsOf(chunks) {
    if (chunks.clair) {
      try { return JSON.parse(chunks.clair); } catch (e) { /* fall through */ }
    }
    if (chunks.parameters) return fromA1111(chunks.parameters);
    return null;
  }

  // Set a Gradio field the way typing does: the value, then input and change events (Svelte listens to them).
  function setField(id, value) {
    if (value === undefined || value === null || value === "") return;
    const root = document.getElementById(id);
    if (!root) return;
    const el = root.querySelector("textarea, input[type=number], input:not([type=range])");
    if (!el) return;
    el.value = String(value);
    el.dispatchEvent(new Event("input", { bubbles: true }));
    el.dispatchEvent(new Event("change", { bubbles: true }));
    el.dispatchEvent(new Event("blur", { bubbles: true }));
  }

  function toast(text) {
    const note = document.getElementById("drop-note") || document.createElement("div");
    note.id = "drop-note";
    note.textContent = text;
    document.body.appendChild(note);
    clearTimeout(note._timer);
    note._timer = setTimeout(() => note.remove(), 6000);
  }

  const onImageTab = (target) => target instanceof Element && target.closest("#image-tab");

  document.addEventListener("dragover", (e) => {
    if (!onImageTab(e.target)) return;
    e.preventDefault(); // a drop here is ours: the browser must not open the file
    if (e.dataTransfer) e.dataTransfer.dropEffect = "copy";
  }, true);

  document.addEventListener("drop", async (e) => {
    if (!onImageTab(e.target)) return;
    const file = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
    if (!file) return;
    e.preventDefault();
    e.stopPropagation();
    if (file.size > 64 * 1024 * 1024) { toast("That file is too large to read."); return; }
    const chunks = await pngText(await file.arrayBuffer());
    const s = chunks && settingsOf(chunks);
    if (!s) { toast("No Clair settings in that file (only PNGs made by Clair or AUTOMATIC1111 hold them)."); return; }
    setField("prompt", s.prompt);
    setField("negative", s.negative_prompt);
    setField("steps", s.steps);
    setField("guidance", s.guidance);
    setField("width", s.width);
    setField("height", s.height);
    setField("seed", s.seed);
    toast(`Settings read from ${file.name}: seed ${s.seed}, ${s.width}×${s.height}.`);
  }, true);
})();
