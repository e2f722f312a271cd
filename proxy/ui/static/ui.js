// Copy buttons: the only script the pages need (paging and deletes are links and forms).
"use strict";
document.addEventListener("click", async (event) => {
  const button = event.target.closest("button.copy");
  if (!button) return;
  const source = document.getElementById(button.dataset.copy);
  if (!source) return;
  const text = source.textContent.trim();
  try {
    await navigator.clipboard.writeText(text);
  } catch (error) {
    // Without the clipboard API (plain http off localhost), select the text for Ctrl+C.
    const range = document.createRange();
    range.selectNodeContents(source);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    button.textContent = "Selected";
    return;
  }
  button.dataset.copied = "";
  button.textContent = "Copied";
});
