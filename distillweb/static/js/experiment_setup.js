/* distillweb: the experiment form's live run count (the page works without it).
 *
 * Recounts on every input what the server will create: students × seeds × training-setting points ×
 * (each recipe's chained runs × its term-sweep points + the hard-label baseline). Values are counted with the
 * sweep syntax of experiments/sweeps.py (a number, a list, START:STOP:logN | linN | stepS) without expanding
 * ranges, so "1:1e9:step1" costs nothing. The server recounts authoritatively on "Check" and on launch.
 * Resource choices sweep too (experiments/forms.py: ChoiceSweepField, OnOffSweepField): n ticked boxes of a
 * group (strategy, precision) give n values, none or one give one; "off and on" (value "both") gives two.
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
    }

    form.addEventListener("input", recount);
    form.addEventListener("change", recount);
    recount();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
