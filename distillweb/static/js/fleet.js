/* distillweb worker fleet console: refreshes each worker's state, heartbeat age, GPUs and current runs from
 * the page's JSON endpoint (<table data-fleet-url="...">) every few seconds, and shows the actions that fit
 * the worker's state. The page works without this file.
 *
 * Everything in the JSON comes from workers' heartbeats, so it is inserted as text (textContent), never as
 * HTML. When a worker appears, disappears or its queues change, the page reloads to get fresh forms.
 */
(function () {
  "use strict";

  var POLL_MS = 3000;
  var STATES = ["online", "draining", "offline"];
  var table = document.querySelector("table[data-fleet-url]");
  if (!table) return;

  function node(tag, className, text) {
    var el = document.createElement(tag);
    if (className) el.className = className;
    if (text !== undefined && text !== null) el.textContent = String(text);
    return el;
  }

  function renderState(cell, worker) {
    var state = STATES.indexOf(worker.state) === -1 ? "offline" : worker.state;
    cell.replaceChildren(node("span", "badge status-" + state, state));
    if (worker.offline && worker.reported_state !== "offline") {
      cell.appendChild(node("div", "muted small", "reported " + worker.reported_state + "; no recent heartbeat"));
    }
  }

  function renderGpus(cell, gpus) {
    cell.replaceChildren();
    if (!gpus.length) {
      cell.appendChild(node("span", "muted", "CPU only"));
      return;
    }
    gpus.forEach(function (gpu) {
      var box = node("div", "gpu");
      var head = node("div");
      head.appendChild(node("span", "muted", "GPU " + (gpu.index === null ? "?" : gpu.index)));
      head.appendChild(document.createTextNode(" " + gpu.name));
      if (gpu.busy) {
        head.appendChild(document.createTextNode(" "));
        head.appendChild(node("span", "tag", "busy"));
      }
      var memory = node("div", "nowrap");
      var bar = node("div", "progress");
      var pct = Math.max(0, Math.min(100, Number(gpu.memory_pct) || 0));
      bar.title = "memory " + pct + "%";
      var fill = node("div", "bar");
      fill.style.width = pct + "%";
      bar.appendChild(fill);
      memory.appendChild(bar);
      memory.appendChild(node("span", "", gpu.memory_text));
      box.appendChild(head);
      box.appendChild(memory);
      box.appendChild(node("div", "muted", gpu.utilization_text + " · " + gpu.temperature_text));
      cell.appendChild(box);
    });
  }

  function renderRuns(cell, runs) {
    cell.replaceChildren();
    if (!runs.length) {
      cell.appendChild(node("span", "muted", "idle"));
      return;
    }
    runs.forEach(function (run) {
      var line = node("div");
      var link = node("a", "", run.label);
      link.href = run.url;
      line.appendChild(link);
      line.appendChild(document.createTextNode(" " + run.detail));
      cell.appendChild(line);
    });
  }

  function update(row, worker) {
    row.classList.toggle("offline", worker.offline);
    renderState(row.querySelector("[data-field='state']"), worker);
    row.querySelector("[data-field='heartbeat']").textContent = worker.heartbeat_text;
    renderGpus(row.querySelector("[data-field='gpus']"), worker.gpus);
    renderRuns(row.querySelector("[data-field='runs']"), worker.runs);
    row.querySelectorAll("[data-states]").forEach(function (el) {
      el.hidden = el.dataset.states.split(" ").indexOf(worker.state) === -1;
    });
  }

  function sameWorkers(workers, rows) {
    if (workers.length !== rows.length) return false;
    return workers.every(function (worker) {
      var row = table.querySelector("tr[data-worker-id='" + Number(worker.id) + "']");
      return row && row.dataset.queues === worker.queues.join(",");
    });
  }

  var delay = POLL_MS;

  function tick() {
    if (document.hidden) return window.setTimeout(tick, delay);
    fetch(table.dataset.fleetUrl, {
      headers: { Accept: "application/json" },
      credentials: "same-origin",
      redirect: "manual",
    })
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json();
      })
      .then(function (data) {
        var rows = table.querySelectorAll("tr[data-worker-id]");
        if (!sameWorkers(data.workers, rows)) {
          window.location.reload();
          return;
        }
        data.workers.forEach(function (worker) {
          update(table.querySelector("tr[data-worker-id='" + Number(worker.id) + "']"), worker);
        });
        table.classList.remove("stale");
        table.title = "";
        delay = POLL_MS;
        window.setTimeout(tick, delay);
      })
      .catch(function () {
        // Logged out, network trouble or a server restart: back off, and say so.
        delay = Math.min(delay * 2, 30000);
        table.classList.add("stale");
        table.title = "Live refresh paused: could not reach the server. Reload the page to retry.";
        if (delay < 30000) window.setTimeout(tick, delay);
      });
  }

  window.setTimeout(tick, delay);
})();
