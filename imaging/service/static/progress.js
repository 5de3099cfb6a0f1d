// The live part of a request's page: its progress fragment again every 3 s while the request is
// pending, approved or running; when it ends, the page again (its download, report, notebooks).
(function () {
  "use strict";
  function poll() {
    var box = document.getElementById("progress");
    var url = box && box.getAttribute("data-live");
    if (!url) return;
    fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) {
        var was = box.getAttribute("data-state");
        var next = new DOMParser().parseFromString(html, "text/html").getElementById("progress");
        if (!next) return;
        if (next.getAttribute("data-state") !== was) {
          window.location.reload();
          return;
        }
        box.replaceWith(next);
        setTimeout(poll, 3000);
      })
      .catch(function () { setTimeout(poll, 5000); });
  }
  document.addEventListener("DOMContentLoaded", function () { setTimeout(poll, 3000); });
})();
