// Lastmile clinic console: live panels over server-sent events, the print button, and the
// refused configuration's page coming back as the console.
// Pages work without it; this only swaps in what the server renders.
(function () {
  "use strict";
  document.addEventListener("click", function (event) {
    var target = event.target.closest ? event.target.closest("[data-print]") : null;
    if (target) { window.print(); }
  });
  // The "settings file has an error" page (503): ask again every few seconds and become the console
  // once it answers otherwise. fetch, not a reload: while the gateway restarts nothing answers, and a
  // reload would leave the doctor on the browser's own error page, which never comes back.
  var untilFixed = document.querySelector("[data-until-fixed]");
  if (untilFixed && window.fetch) {
    var every = 1000 * (parseInt(untilFixed.getAttribute("data-until-fixed"), 10) || 10);
    var ask = function () {
      fetch(window.location.href, { cache: "no-store", credentials: "same-origin" }).then(function (reply) {
        if (reply.status !== 503) { window.location.reload(); return null; }
        return reply.text();
      }).then(function (html) {
        if (html === null) { return; }
        setTimeout(ask, every);
        // still refused: show the file's newest error (the technician may be editing it)
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("refused-error");
        var shown = document.getElementById("refused-error");
        if (fresh && shown && fresh.textContent !== shown.textContent) { shown.textContent = fresh.textContent; }
      }).catch(function () { setTimeout(ask, every); });  // nothing answers: restarting, ask again
    };
    setTimeout(ask, every);
    return;
  }
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
  // Today's stream sends its panels; another page's, the critical-result banner alone (data-stream)
  var streamed = document.querySelector("[data-stream]");
  var source = new EventSource(streamed ? streamed.getAttribute("data-stream") : "/events");
  var received = 0;
  source.addEventListener("panel", function (event) {
    var data = JSON.parse(event.data);
    // How many panel events came: lets a reader (or a test) know the first round has arrived.
    document.documentElement.setAttribute("data-live-events", String(++received));
    swap(data.id, data.html, data.version);
  });
  // The login ended (or another took its place in another tab): Today goes to the login page; another
  // page keeps what it shows (a form there says so when sent), its banner no longer live.
  source.addEventListener("logout", function () {
    source.close();
    document.documentElement.setAttribute("data-live", "off");
    if (!streamed) { window.location.reload(); }
  });
  // The gateway stopped (or the link to it): the panels stay as they were, so say that this page
  // is no longer current while the stream is down; the browser reconnects by itself (retry: 3 s).
  // Shown after one reconnect's wait, not at once: leaving the page also ends the stream, and a
  // stream cut once (a Wi-Fi blip) is back within the 3 s.
  var down = document.getElementById("stream-down");
  var REFUSED_KEY = "lastmile-stream-refused-at";  // when this tab's stream was last refused
  var downTimer = null;
  source.addEventListener("error", function () {
    document.documentElement.setAttribute("data-live", "off");
    // Refused (a 401 once the login timed out while the tablet slept, a 503): the browser never
    // tries again, so the banner would stay for good. Load the page afresh (the login page, for a
    // 401) after 3 s. Refused again right after such a reload: say the page is not current and
    // wait a minute, not reload every 3 s (a doctor typing a patient's ID would lose it each time).
    if (source.readyState === EventSource.CLOSED) {
      var refusedAt = parseInt(sessionStorage.getItem(REFUSED_KEY) || "0", 10);
      var again = Date.now() - refusedAt < 120000;
      if (again && down) { down.hidden = false; }
      sessionStorage.setItem(REFUSED_KEY, String(Date.now()));
      setTimeout(function () { window.location.reload(); }, again ? 60000 : 3000);
      return;
    }
    if (down && downTimer === null) {
      downTimer = setTimeout(function () {
        downTimer = null;
        if (source.readyState !== EventSource.OPEN) { down.hidden = false; }
      }, 4000);
    }
  });
  source.addEventListener("open", function () {
    sessionStorage.removeItem(REFUSED_KEY);
    document.documentElement.setAttribute("data-live", "on");
    if (downTimer !== null) { clearTimeout(downTimer); downTimer = null; }
    if (down) { down.hidden = true; }
  });
})();
