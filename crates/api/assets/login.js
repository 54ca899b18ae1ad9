// The login page: the link of `nonstop dashboard` carries a single-use
// token in its fragment (/login#token=...), which no server log or
// Referer sees. It is taken out of the address bar at once, exchanged for
// a session (POST /login), and the session is kept in sessionStorage:
// this origin's, this tab's, sent by the page's own calls only.
"use strict";
(function () {
  const KEY = "nonstop-session";
  const why = message => { document.getElementById("login-why").textContent = message; };

  async function start() {
    const q = new URLSearchParams(location.hash.slice(1));
    const token = q.get("token");
    q.delete("token");
    const page = "/" + (q.toString() ? "#" + q.toString() : "");
    history.replaceState(null, "", "/login");
    if (!token) {
      if (sessionStorage.getItem(KEY)) location.replace(page);
      return;
    }
    why("Logging in…");
    try {
      const resp = await fetch("/login", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ token }),
        credentials: "omit",
      });
      const body = await resp.json().catch(() => ({}));
      if (!resp.ok || !body.session) {
        why(body.message || "The login failed (" + resp.status + "): run `nonstop dashboard` for a new link.");
        return;
      }
      sessionStorage.setItem(KEY, body.session);
      location.replace(page);
    } catch (e) {
      why("Cannot reach the daemon (" + e.message + "): is it running? Run `nonstop dashboard` for a new link.");
    }
  }
  document.addEventListener("DOMContentLoaded", start);
})();
