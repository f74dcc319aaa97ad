// Tokens page: the Revoke buttons, as fetch() calls to the JSON API with the dashboard's write
// header (the API requires it on cookie-authenticated writes).
(function () {
  "use strict";

  const result = document.getElementById("action-result");

  function say(text, isError) {
    result.textContent = text;
    result.classList.toggle("error", Boolean(isError));
    result.hidden = false;
  }

  document.querySelectorAll("button.revoke").forEach(function (button) {
    button.addEventListener("click", function () {
      if (!window.confirm("Revoke token " + button.dataset.name + "? Its sessions end now.")) return;
      button.disabled = true;
      fetch("/api/tokens/" + encodeURIComponent(button.dataset.id) + "/revoke", {
        method: "POST",
        credentials: "same-origin",
        headers: { Accept: "application/json", "X-Fedcl-Dashboard": "1" },
      })
        .then(function (resp) {
          return resp.json().catch(function () { return {}; }).then(function (body) {
            if (!resp.ok) throw new Error(typeof body.detail === "string" ? body.detail : String(resp.status));
            window.location.reload();
          });
        })
        .catch(function (err) {
          say(err.message, true);
          button.disabled = false;
        });
    });
  });
})();
