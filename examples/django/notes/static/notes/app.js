// The notes example's script; collectstatic stores it as app.<hash>.js.
// Posts the form as JSON to the CSRF-exempt /notes/ endpoint, then reloads.
document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("new-note");
  if (!form) return;
  const status = document.getElementById("status");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = form.elements.text.value;
    status.textContent = "saving…";
    try {
      const response = await fetch("/notes/", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ text }),
      });
      if (response.status !== 201) throw new Error(`HTTP ${response.status}`);
      window.location.reload();
    } catch (error) {
      status.textContent = `could not save: ${error.message}`;
    }
  });
});
