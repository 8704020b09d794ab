/* distillweb: small progressive enhancements. Every page works without this file.
 *
 * - draws plotly figures handed over by the server with json_script (<div class="plot" data-figure="ID">)
 * - live refresh: <div data-live-url="..." data-live-active="1"> polls its JSON endpoint every 2 s, swaps in
 *   the server-rendered "html" and redraws any "figures"; when nothing is queued or running any more the page
 *   reloads once, so results, artifacts and buttons appear
 * - shows only the fields of the chosen source on the model / dataset forms
 * - filters the experiment form's choices by team and previews how many runs it will create
 * - asks for confirmation before forms marked data-confirm are submitted
 * - selects the whole value of a field marked data-select-on-focus when it gets the focus
 * - a checkbox marked data-log-y="PLOT-ID" switches that plot's y axis between linear and log; the choice
 *   survives the live refresh's redraws
 *
 * The site's Content-Security-Policy allows scripts from this site only: no inline <script> or on*= attribute.
 */
(function () {
  "use strict";

  var POLL_MS = 2000;
  var CURVES_EVERY = 3; // polls; curves cost more than the status, so refresh them every ~6 s
  var PLOT_CONFIG = { responsive: true, displaylogo: false, modeBarButtonsToRemove: ["lasso2d", "select2d"] };

  function showEmpty(el, text) {
    el.replaceChildren();
    var p = document.createElement("p");
    p.className = "empty";
    p.textContent = text || "Nothing to plot yet.";
    el.appendChild(p);
    el.dataset.drawn = "";
  }

  function draw(el, fig) {
    if (!el || !fig) return;
    if (!fig.data || fig.data.length === 0) {
      if (el.dataset.drawn && window.Plotly) window.Plotly.purge(el);
      showEmpty(el, el.dataset.empty);
      return;
    }
    if (!window.Plotly) {
      showEmpty(el, "The plotting library could not be loaded.");
      return;
    }
    if (!el.dataset.drawn) el.replaceChildren();
    var layout = fig.layout || {};
    if (el.dataset.logY === "1") {
      layout.yaxis = Object.assign({}, layout.yaxis, { type: "log" });
    }
    window.Plotly.react(el, fig.data, layout, PLOT_CONFIG);
    el.dataset.drawn = "1";
  }

  function drawAll() {
    document.querySelectorAll(".plot[data-figure]").forEach(function (el) {
      var source = document.getElementById(el.dataset.figure);
      if (!source) return;
      try {
        draw(el, JSON.parse(source.textContent));
      } catch (err) {
        showEmpty(el, "This figure could not be read.");
      }
    });
  }

  function live(el) {
    var url = el.dataset.liveUrl;
    var polls = 0;
    var delay = POLL_MS;

    function schedule() {
      window.setTimeout(tick, delay);
    }

    function tick() {
      if (document.hidden) return schedule();
      polls += 1;
      var wantCurves = polls % CURVES_EVERY === 0;
      fetch(url + (wantCurves ? "?curves=1" : ""), {
        headers: { Accept: "application/json" },
        credentials: "same-origin",
        redirect: "manual",
      })
        .then(function (response) {
          if (!response.ok) throw new Error("HTTP " + response.status);
          return response.json();
        })
        .then(function (data) {
          delay = POLL_MS;
          el.classList.remove("stale");
          el.innerHTML = data.html; // rendered and escaped by the server's templates
          Object.keys(data.figures || {}).forEach(function (id) {
            draw(document.getElementById(id), data.figures[id]);
          });
          if (data.active) return schedule();
          window.location.reload(); // finished: show results, artifacts and the right buttons
        })
        .catch(function () {
          // Logged out, network trouble or a server restart: back off, and say so.
          delay = Math.min(delay * 2, 30000);
          el.classList.add("stale");
          el.title = "Live refresh paused: could not reach the server. Reload the page to retry.";
          if (delay < 30000) schedule();
        });
    }

    schedule();
  }

  function sourceForms() {
    document.querySelectorAll("form[data-source-form]").forEach(function (form) {
      var radios = form.querySelectorAll("input[name='source']");
      function update() {
        var chosen = form.querySelector("input[name='source']:checked");
        var value = chosen ? chosen.value : "";
        form.querySelectorAll("[data-show-when]").forEach(function (field) {
          field.hidden = value !== "" && field.dataset.showWhen.split(" ").indexOf(value) === -1;
        });
      }
      radios.forEach(function (radio) { radio.addEventListener("change", update); });
      update();
    });
  }

  function countSeeds(text) {
    var n = 0;
    text.split(",").forEach(function (part) {
      part = part.trim();
      if (!part) return;
      var range = /^(\d+)-(\d+)$/.exec(part);
      n += range ? Math.max(0, Number(range[2]) - Number(range[1]) + 1) : 1;
    });
    return n;
  }

  function experimentForm() {
    var form = document.querySelector("form[data-experiment-form]");
    if (!form) return;
    var team = form.querySelector("select[name='team']");
    var students = form.querySelector("select[name='students']");
    var recipes = form.querySelector("select[name='recipes']");
    var seeds = form.querySelector("input[name='seeds']");
    var plan = form.querySelector("[data-run-plan]");

    function filterByTeam() {
      if (!team) return;
      form.querySelectorAll("select[name='dataset'], select[name='teacher'], select[name='students'], " +
                            "select[name='recipes']").forEach(function (select) {
        Array.prototype.forEach.call(select.options, function (option) {
          if (!option.dataset.team) return;
          var other = option.dataset.team !== team.value;
          option.hidden = other;
          if (other) option.selected = false;
        });
      });
    }

    function preview() {
      if (!plan || !students || !recipes || !seeds) return;
      var s = students.selectedOptions.length;
      var chosen = Array.prototype.filter.call(recipes.selectedOptions, function (o) {
        return o.dataset.baseline !== "1";
      }).length;
      var k = countSeeds(seeds.value);
      if (!s || !k || !recipes.selectedOptions.length) {
        plan.textContent = "";
        return;
      }
      var runs = s * k * (chosen + 1);
      plan.textContent = "Creates " + runs + " run" + (runs === 1 ? "" : "s") + ": " + s + " student" +
        (s === 1 ? "" : "s") + " × (" + chosen + " recipe" + (chosen === 1 ? "" : "s") +
        " + hard-label baseline) × " + k + " seed" + (k === 1 ? "" : "s") + ".";
    }

    if (team) team.addEventListener("change", function () { filterByTeam(); preview(); });
    [students, recipes, seeds].forEach(function (el) {
      if (el) el.addEventListener(el === seeds ? "input" : "change", preview);
    });
    filterByTeam();
    preview();
  }

  function confirms() {
    document.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.dataset.confirm)) event.preventDefault();
      });
    });
  }

  function selectOnFocus() {
    // A field whose whole value is meant to be copied (a new API token): focusing it selects it.
    document.querySelectorAll("[data-select-on-focus]").forEach(function (input) {
      input.addEventListener("focus", function () { input.select(); });
    });
  }

  function logToggles() {
    document.querySelectorAll("input[data-log-y]").forEach(function (box) {
      var plot = document.getElementById(box.dataset.logY);
      if (!plot) return;
      var tools = box.closest("[data-plot-tools]");
      if (tools) tools.hidden = false; // useful only with this script
      box.addEventListener("change", function () {
        plot.dataset.logY = box.checked ? "1" : "";
        if (plot.dataset.drawn && window.Plotly) {
          window.Plotly.relayout(plot, { "yaxis.type": box.checked ? "log" : "linear" });
        }
      });
      if (box.checked) plot.dataset.logY = "1"; // restored by "back"
    });
  }

  function start() {
    logToggles();
    drawAll();
    selectOnFocus();
    document.querySelectorAll("[data-live-url]").forEach(function (el) {
      if (el.dataset.liveActive === "1") live(el);
    });
    sourceForms();
    experimentForm();
    confirms();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
