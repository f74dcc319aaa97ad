// Versions page: promote / candidate / roll back buttons and the canary check, as fetch() calls
// to the JSON API. The custom header marks them as coming from the dashboard's own pages (the
// API requires it on cookie-authenticated writes, so another site cannot forge them).
(function () {
  "use strict";

  const KEY = "fedcl-version-message";
  const result = document.getElementById("action-result");

  function say(text, isError) {
    if (!result) return;
    result.textContent = text;
    result.classList.toggle("error", Boolean(isError));
    result.hidden = false;
  }

  const stored = window.sessionStorage.getItem(KEY);
  if (stored) {
    window.sessionStorage.removeItem(KEY);
    say(stored, false);
  }

  function post(url) {
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { Accept: "application/json", "X-Fedcl-Dashboard": "1" },
    }).then(function (resp) {
      return resp.json().catch(function () { return {}; }).then(function (body) {
        if (!resp.ok) {
          throw new Error(typeof body.detail === "string" ? body.detail : resp.status + " " + resp.statusText);
        }
        return body;
      });
    });
  }

  function doneThenReload(message) {
    window.sessionStorage.setItem(KEY, message);
    window.location.reload();
  }

  document.querySelectorAll("button.act").forEach(function (button) {
    button.addEventListener("click", function () {
      const url = "/api/versions/" + encodeURIComponent(button.dataset.id) + "/" + button.dataset.action;
      document.querySelectorAll("button.act").forEach(function (b) { b.disabled = true; });
      post(url)
        .then(function (body) { doneThenReload(body.message); })
        .catch(function (err) {
          say(err.message, true);
          document.querySelectorAll("button.act").forEach(function (b) { b.disabled = b.hasAttribute("data-locked"); });
        });
    });
  });

  const canary = document.getElementById("canary-form");
  if (canary) {
    canary.addEventListener("submit", function (event) {
      event.preventDefault();
      const drop = document.getElementById("max-drop").value || "0.05";
      const url = "/api/runs/" + encodeURIComponent(canary.dataset.run) + "/canary?max_drop=" + encodeURIComponent(drop);
      post(url)
        .then(function (body) {
          if (body.action === "rolled_back") doneThenReload(body.message);
          else say(body.message, false);
        })
        .catch(function (err) { say(err.message, true); });
    });
  }
})();
