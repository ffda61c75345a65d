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
  function swap(id, html, version) {
    var panel = document.getElementById(id);
    if (!panel) { return; }
    // The stream sends every panel when it (re)connects: swap only what changed since rendering.
    if (version && panel.getAttribute("data-version") === version) { delete pending[id]; return; }
    // Never pull a field away from under someone typing in it: wait until they leave it.
    if (panel.contains(document.activeElement) && document.activeElement !== document.body) {
      pending[id] = [html, version];
      return;
    }
    delete pending[id];
    panel.innerHTML = html;
    if (version) { panel.setAttribute("data-version", version); }
    panel.setAttribute("data-updated", String(Date.now()));
  }
  document.addEventListener("focusout", function () {
    setTimeout(function () {
      Object.keys(pending).forEach(function (id) { swap(id, pending[id][0], pending[id][1]); });
    }, 0);
  });
  var source = new EventSource("/events");
  var received = 0;
  source.addEventListener("panel", function (event) {
    var data = JSON.parse(event.data);
    // How many panel events came: lets a reader (or a test) know the first round has arrived.
    document.documentElement.setAttribute("data-live-events", String(++received));
    swap(data.id, data.html, data.version);
  });
  source.addEventListener("logout", function () { source.close(); window.location.reload(); });
  source.addEventListener("open", function () { document.documentElement.setAttribute("data-live", "on"); });
})();
