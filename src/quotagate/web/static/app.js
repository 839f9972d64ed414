// Progressive enhancement only: every page works without this file, except the clipboard button.
document.addEventListener("click", async (event) => {
  const target = event.target.closest("button");
  if (!target) return;
  if (target.dataset.copy) {
    const field = document.querySelector(target.dataset.copy);
    const note = target.closest("dialog, section, body").querySelector("[data-copied]");
    try {
      await navigator.clipboard.writeText(field.value);
      if (note) note.textContent = "Copied to the clipboard.";
    } catch (err) {
      field.select();
      if (note) note.textContent = "Selected: press Ctrl+C (or ⌘C) to copy.";
    }
    target.textContent = "Copy";
  } else if (target.dataset.openDialog) {
    document.getElementById(target.dataset.openDialog).showModal();
  } else if ("closeDialog" in target.dataset) {
    target.closest("dialog").close();
  }
});
document.addEventListener("change", (event) => {
  const el = event.target;
  if (el.matches("[data-autosubmit]")) {
    // Like submitting the GET form, but without a bare "?" when nothing is ticked.
    const query = new URLSearchParams(new FormData(el.form)).toString();
    window.location.href = el.form.action.split("?")[0] + (query ? "?" + query : "");
  }
  if (el.matches("[data-navigate]")) window.location.href = el.value;
});
// The secret dialog is rendered open (so it shows without JavaScript); make it modal, with a backdrop.
document.addEventListener("DOMContentLoaded", () => {
  const dialog = document.querySelector("dialog[data-secret-dialog][open]");
  if (dialog && dialog.showModal) {
    dialog.close();
    dialog.showModal();
    dialog.querySelector("[data-secret]").select();
  }
});
