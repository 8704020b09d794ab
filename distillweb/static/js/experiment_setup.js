/* distillweb: the experiment form's live run count (the page works without it).
 *
 * Recounts on every input what the server will create: students × seeds × training-setting points ×
 * (each recipe's chained runs × its term-sweep points + the hard-label baseline). Values are counted with the
 * sweep syntax of experiments/sweeps.py (a number, a list, START:STOP:logN | linN | stepS) without expanding
 * ranges, so "1:1e9:step1" costs nothing. The server recounts authoritatively on "Check" and on launch.
 * Resource choices sweep too (experiments/forms.py: ChoiceSweepField, OnOffSweepField): n ticked boxes of a
 * group (strategy, precision) give n values, none or one give one; "off and on" (value "both") gives two.
 * Create is disabled while the count is over the limit, and a pre-flight panel is marked out of date on any
 * edit after its check.
 *
 * Model pickers (selects marked data-model-picker) get a search box, a filter to the models that fit the
 * chosen dataset (its task, input kind and, for classification, number of classes; selected models always
 * stay listed) and removable chips for the chosen models. The selects themselves still post the form.
 */
(function () {
  "use strict";

  var NUMBER = "[+-]?(?:\\d+(?:\\.\\d*)?|\\.\\d+)(?:[eE][+-]?\\d+)?";
  var NUMBER_RE = new RegExp("^" + NUMBER + "$");
  var RANGE_RE = new RegExp("^(" + NUMBER + "):(" + NUMBER + "):(log|lin|step)(" + NUMBER + ")$", "i");
  var AXIS_RE = /^([a-z][a-z0-9_]*)\.([a-z][a-z0-9_]*)$/;

  function plural(n, word) {
    return n.toLocaleString("en-US") + " " + word + (n === 1 ? "" : "s");
  }

  // How many values a sweep field gives; throws an Error whose message says what is wrong.
  function countValues(text) {
    text = text.trim();
    if (!text) return 0;
    var total = 0;
    text.split(",").forEach(function (raw) {
      var item = raw.replace(/\s+/g, "");
      if (!item) throw new Error("separate values with single commas");
      if (item.indexOf(":") === -1) {
        if (!NUMBER_RE.test(item)) throw new Error('"' + item + '" is not a number');
        total += 1;
        return;
      }
      var m = RANGE_RE.exec(item);
      if (!m) throw new Error('"' + item + '" is not a range like 1e-4:1e-3:log4');
      var start = Number(m[1]), stop = Number(m[2]), mode = m[3].toLowerCase(), arg = Number(m[4]);
      if (!(start < stop)) throw new Error('in "' + item + '" the start must be smaller than the stop');
      if (mode === "step") {
        if (!(arg > 0)) throw new Error('in "' + item + '" the step must be above 0');
        total += Math.floor(((stop - start) / arg) * (1 + 1e-12) + 1e-9) + 1;
      } else {
        if (!(Number.isInteger(arg) && arg >= 2)) throw new Error('in "' + item + '" give 2 or more values');
        total += arg;
      }
    });
    return total;
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

  // {axis: count} for the recipe term sweeps, one "TERM.PARAM = values" per line.
  function termAxes(text) {
    var axes = {};
    text.split("\n").forEach(function (line) {
      line = line.trim();
      if (!line || line.charAt(0) === "#") return;
      var at = line.indexOf("=");
      var axis = at === -1 ? "" : line.slice(0, at).replace(/\s+/g, "").toLowerCase();
      if (!AXIS_RE.test(axis)) throw new Error("write TERM.PARAM = values, e.g. kd.temperature = 2, 4, 8");
      var values = line.slice(at + 1).trim();
      // Choice and true/false parameters take plain lists; numbers may use ranges.
      var n = /[a-df-z]/i.test(values.replace(/(log|lin|step)/gi, "")) ?
        values.split(",").filter(function (v) { return v.trim(); }).length : countValues(values);
      if (!n) throw new Error(axis + " has no values");
      axes[axis] = n;
    });
    return axes;
  }

  // [{name, count}] for the choice sweeps: groups of several checkboxes of one name, and off/on selects.
  function choiceSweeps(form) {
    var groups = {};
    var order = [];
    form.querySelectorAll("input[type='checkbox'][name]").forEach(function (box) {
      if (!groups[box.name]) {
        groups[box.name] = { boxes: 0, ticked: 0 };
        order.push(box.name);
      }
      groups[box.name].boxes += 1;
      if (box.checked) groups[box.name].ticked += 1;
    });
    var found = order.filter(function (name) { return groups[name].boxes > 1; }).map(function (name) {
      return { name: name, count: Math.max(groups[name].ticked, 1) };
    });
    form.querySelectorAll("select[name]").forEach(function (select) {
      if (select.multiple || !select.querySelector("option[value='both']")) return;
      found.push({ name: select.name, count: select.value === "both" ? 2 : 1 });
    });
    return found;
  }

  function start() {
    var form = document.querySelector("form[data-setup-form]");
    if (!form) return;
    var out = form.querySelector("[data-sweep-count]");
    // Not form.dataset: the form's <select name="dataset"> shadows that property.
    var limit = Number(form.getAttribute("data-run-limit")) || Infinity;
    var students = form.querySelector("select[name='students']");
    var derive = form.querySelector("select[name='derive_student']");
    var recipes = form.querySelector("select[name='recipes']");
    var dataset = form.querySelector("select[name='dataset']");
    var seeds = form.querySelector("input[name='seeds']");
    var terms = form.querySelector("textarea[name='term_sweeps']");
    var sweepInputs = form.querySelectorAll("input[data-sweep]");

    function recount() {
      var problems = [];
      var trainPoints = 1;
      var swept = [];
      sweepInputs.forEach(function (input) {
        try {
          var n = countValues(input.value);
          if (n > 1) {
            trainPoints *= n;
            swept.push(input.name + " ×" + n);
          }
        } catch (err) {
          problems.push(input.name + ": " + err.message);
        }
      });
      choiceSweeps(form).forEach(function (choice) {
        if (choice.count > 1) {
          trainPoints *= choice.count;
          swept.push(choice.name + " ×" + choice.count);
        }
      });
      var axes = {};
      if (terms) {
        try {
          axes = termAxes(terms.value);
        } catch (err) {
          problems.push("recipe parameter sweeps: " + err.message);
        }
      }
      var s = (students ? students.selectedOptions.length : 0) + (derive && derive.value ? 1 : 0);
      var k = seeds ? countSeeds(seeds.value) : 0;
      var picked = recipes ? Array.prototype.slice.call(recipes.selectedOptions) : [];
      var option = dataset && dataset.selectedOptions[0];
      var baseline = !(option && option.dataset.task === "embedding");
      if (problems.length || !s || !k || !picked.length) guardLaunch(form, 0, limit);
      if (problems.length) {
        out.textContent = "Check the sweeps: " + problems.join("; ") + ".";
        out.classList.add("text-bad");
        return;
      }
      if (!s || !k || !picked.length) {
        out.textContent = "Choose students, recipes and seeds to see how many runs this creates.";
        out.classList.remove("text-bad");
        return;
      }
      var perPoint = baseline ? 1 : 0;
      var parts = [];
      picked.forEach(function (o) {
        if (o.dataset.baseline === "1") return;
        var names = (o.dataset.terms || "").split(" ");
        var points = 1;
        Object.keys(axes).forEach(function (axis) {
          if (names.indexOf(axis.split(".")[0]) !== -1) points *= axes[axis];
        });
        var chain = Number(o.dataset.chain) || 1;
        perPoint += chain * points;
        var label = o.textContent.trim().split(" · ")[0];
        parts.push(label + (points > 1 ? " × " + points + " term values" : "") +
                   (chain > 1 ? " × " + chain + " chained runs" : ""));
      });
      if (baseline) parts.push("baseline");
      var total = s * k * trainPoints * perPoint;
      var text = "Creates " + plural(total, "run") + ": " + plural(s, "student") + " × " + plural(k, "seed") +
        (trainPoints > 1 ? " × " + plural(trainPoints, "training setting") + " (" + swept.join(", ") + ")" : "") +
        " × (" + parts.join(" + ") + ").";
      if (total > limit) text += " That is over the limit of " + limit.toLocaleString("en-US") + " runs: sweep fewer values.";
      out.textContent = text;
      out.classList.toggle("text-bad", total > limit);
      out.dataset.runs = String(total);
      guardLaunch(form, total, limit);
    }

    form.addEventListener("input", recount);
    form.addEventListener("change", recount);
    recount();
    markStaleOnEdit(form);
    form.querySelectorAll("select[data-model-picker]").forEach(function (select) {
      modelPicker(form, select, dataset);
    });
  }

  // Create is disabled while the live count is over the limit (the server refuses such a grid anyway).
  function guardLaunch(form, total, limit) {
    var launch = form.querySelector("[data-launch]");
    if (!launch) return;
    var over = total > limit;
    launch.disabled = over;
    launch.title = over ? "Over the limit of " + limit.toLocaleString("en-US") + " runs: sweep fewer values." : "";
  }

  // The pre-flight panel describes the form as it was checked: any edit after that marks it out of date.
  function markStaleOnEdit(form) {
    var panel = form.querySelector("#preflight");
    if (!panel) return;
    function stale(event) {
      // Only edits of posted fields count (a picker's search box is not one).
      if (!event.target.name || panel.classList.contains("preflight-stale")) return;
      panel.classList.add("preflight-stale");
      panel.setAttribute("data-stale", "1");
      var badge = panel.querySelector("h2 .badge");
      if (badge) {
        badge.className = "badge status-empty";
        badge.textContent = "out of date";
      }
      var note = document.createElement("p");
      note.className = "preflight-stale-note";
      note.setAttribute("role", "status");
      note.appendChild(document.createTextNode("Out of date: the form changed after this check. "));
      var again = document.createElement("button");
      again.type = "button";
      again.className = "btn btn-small";
      again.textContent = "Check again";
      again.addEventListener("click", function () {
        var check = form.querySelector("button[data-check]");
        if (check) check.click();
      });
      note.appendChild(again);
      panel.insertBefore(note, panel.children[1] || null);
    }
    form.addEventListener("input", stale);
    form.addEventListener("change", stale);
  }

  // --- model pickers: search, filter by the dataset's task, chips -----------------------------------
  function modelName(option) {
    return option.getAttribute("data-name") || option.textContent.split(" — ")[0].trim();
  }

  // Whether a model can train on the chosen dataset: same task and input kind, and (classification) the
  // same number of classes. No dataset chosen: every model fits.
  function fits(option, datasetOption) {
    if (!datasetOption || !datasetOption.value) return true;
    var d = datasetOption.dataset, m = option.dataset;
    if (m.task !== d.task || (m.kind && d.kind && m.kind !== d.kind)) return false;
    return d.task !== "classification" || m.labels === d.labels;
  }

  function modelPicker(form, select, datasetSelect) {
    var team = form.querySelector("select[name='team']");
    var field = select.parentNode;
    var bar = document.createElement("div");
    bar.className = "picker-bar";
    var search = document.createElement("input");
    search.type = "search";
    search.className = "picker-search";
    search.placeholder = "Search models…";
    search.setAttribute("aria-label", "Search " + select.getAttribute("data-model-picker").replace("_", " "));
    search.setAttribute("aria-controls", select.id);
    search.autocomplete = "off";
    var allLabel = document.createElement("label");
    allLabel.className = "picker-all small";
    var all = document.createElement("input");
    all.type = "checkbox";
    allLabel.appendChild(all);
    allLabel.appendChild(document.createTextNode(" show models that do not fit"));
    var status = document.createElement("span");
    status.className = "picker-status muted small";
    status.setAttribute("aria-live", "polite");
    bar.appendChild(search);
    bar.appendChild(allLabel);
    var chips = document.createElement("ul");
    chips.className = "picker-chips";
    chips.setAttribute("aria-label", "Chosen");
    field.insertBefore(bar, select);
    field.insertBefore(status, select);
    field.insertBefore(chips, select);

    function datasetOption() {
      return datasetSelect && datasetSelect.selectedOptions[0];
    }

    function filter() {
      var terms = search.value.trim().toLowerCase().split(/\s+/).filter(Boolean);
      var chosen = datasetOption();
      var shown = 0, fitting = 0, total = 0;
      Array.prototype.forEach.call(select.options, function (option) {
        if (!option.value) return;
        total += 1;
        var ok = fits(option, chosen);
        if (ok) fitting += 1;
        var text = option.textContent.toLowerCase();
        var found = terms.every(function (t) { return text.indexOf(t) !== -1; });
        var teamOk = !team || !option.dataset.team || option.dataset.team === team.value;
        var visible = teamOk && (option.selected || (found && (ok || all.checked)));
        option.hidden = !visible;
        option.classList.toggle("picker-misfit", !ok);
        if (visible) shown += 1;
      });
      var text = chosen && chosen.value ?
        fitting + " of " + total + " models fit " + chosen.textContent.trim() : total + " models";
      if (terms.length) text += "; " + shown + " shown";
      status.textContent = text + ".";
    }

    function renderChips() {
      chips.textContent = "";
      var chosen = datasetOption();
      Array.prototype.forEach.call(select.selectedOptions, function (option) {
        if (!option.value) return;
        var chip = document.createElement("li");
        chip.className = "chip" + (fits(option, chosen) ? "" : " chip-misfit");
        chip.setAttribute("data-chip", option.value);
        chip.title = option.textContent.trim() + (fits(option, chosen) ? "" : " (does not fit the dataset)");
        chip.appendChild(document.createTextNode(modelName(option)));
        var remove = document.createElement("button");
        remove.type = "button";
        remove.className = "chip-remove";
        remove.setAttribute("aria-label", "Remove " + modelName(option));
        remove.textContent = "×";
        remove.addEventListener("click", function () {
          if (select.multiple) option.selected = false;
          else select.value = "";
          select.dispatchEvent(new Event("change", { bubbles: true }));
        });
        chip.appendChild(remove);
        chips.appendChild(chip);
      });
      chips.hidden = !chips.children.length;
    }

    function update() {
      filter();
      renderChips();
    }

    search.addEventListener("input", filter);
    search.addEventListener("keydown", function (event) {
      if (event.key === "Enter") event.preventDefault();  // never submits the form
    });
    all.addEventListener("change", filter);
    select.addEventListener("change", renderChips);
    if (datasetSelect) datasetSelect.addEventListener("change", update);
    if (team) team.addEventListener("change", update);
    update();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
