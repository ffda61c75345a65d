// Lastmile clinic console: live panels over server-sent events, and the print button.
// Pages work without it; this only swaps in what the server renders.
(function () {
  "use strict";
  document.addEventListener("click", function (event) {
    var target = event.target.closest ? event.target.closest("[data-print]") : null;
    if (target) { window.print(); }
  });
  if (!window.EventSource || !document.querySelector("[data-live]")) { return; }
  var pending = {};
  function swap(id, html) {
    var panel = document.getElementById(id);
    if (!panel) { return; }
    // Never pull a field away from under someone typing in it: wait until they leave it.
    if (panel.contains(document.activeElement) && document.activeElement !== document.body) {
      pending[id] = html;
      return;
    }
    delete pending[id];
    panel.innerHTML = html;
    panel.setAttribute("data-updated", String(Date.now()));
  }
  document.addEventListener("focusout", function () {
    setTimeout(function () {
      Object.keys(pending).forEach(function (id) { swap(id, pending[id]); });
    }, 0);
  });
  var source = new EventSource("/events");
  source.addEventListener("panel", function (event) {
    var data = JSON.parse(event.data);
    swap(data.id, data.html);
  });
  source.addEventListener("logout", function () { source.close(); window.location.reload(); });
  source.addEventListener("open", function () { document.documentElement.setAttribute("data-live", "on"); });
})();
