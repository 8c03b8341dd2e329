// Behaviour shared by every portal page. Pages work without it (plain forms and links); this adds
// conveniences: copy buttons. (htmx requests carry the CSRF token through hx-headers on <body>.) The
// organization switcher has its own button rather than submitting on change, so choosing with the arrow
// keys never navigates away (WCAG 3.2.2).
async function copyText(text: string): Promise<boolean> {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // Clipboard API refused (insecure origin, no permission): fall back to selecting a temporary field.
    const area = document.createElement("textarea");
    area.value = text;
    document.body.appendChild(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    return ok;
  }
}

document.addEventListener("click", async (e) => {
  const button = (e.target as HTMLElement).closest<HTMLButtonElement>("button[data-copy-target]");
  if (!button) return;
  const target = document.getElementById(button.dataset.copyTarget || "");
  if (!target) return;
  const ok = await copyText((target.textContent || "").trim());
  const status = document.getElementById(button.dataset.copyStatus || "") || button;
  status.textContent = ok ? "Copied" : "Copy failed: select the text and copy it";
});

export {};
