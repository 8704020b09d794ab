// The recipe form: each loss-term row shows only its term's parameters (with that term's defaults as
// placeholders), "+ add term" adds a row from the page's <template>, and the scheme shows only its own
// parameters. Hidden inputs are disabled so they are not sent. Without this script the page still works:
// it then shows a fixed number of rows with every parameter.
(function () {
  "use strict";

  function parseDefaults(text) {
    var out = {};
    (text || "").split(" ").forEach(function (pair) {
      var i = pair.indexOf("=");
      if (i > 0) out[pair.slice(0, i)] = pair.slice(i + 1);
    });
    return out;
  }

  function setShown(box, shown) {
    box.hidden = !shown;
    box.querySelectorAll("input, select, textarea").forEach(function (input) {
      input.disabled = !shown;
    });
  }

  function showDefault(input, key, fresh) {
    var defaults = parseDefaults(input.dataset.defaults);
    var value = defaults[key];
    if (input.tagName === "SELECT") {
      if (input.options.length && input.options[0].value === "") {
        input.options[0].textContent = value !== undefined ? "default (" + value + ")" : "default";
      }
    } else if (input.type === "checkbox") {
      if (fresh && value !== undefined) input.checked = value === "true";
    } else {
      input.placeholder = value !== undefined ? value : "default";
    }
  }

  function termOf(row) {
    var select = row.querySelector("select[name$='-name']");
    return select ? select.value : "";
  }

  function updateRow(row, fresh) {
    var term = termOf(row);
    var shown = 0;
    row.querySelectorAll("[data-param]").forEach(function (box) {
      var takes = term !== "" && box.dataset.terms.split(" ").indexOf(term) !== -1;
      setShown(box, takes);
      if (fresh) {
        // A newly chosen term starts from its own defaults, not from the previous term's values.
        box.querySelectorAll("input[type=number], input[type=text], select").forEach(function (input) {
          input.value = "";
        });
        box.classList.remove("has-error");
        box.querySelectorAll(".errorlist").forEach(function (list) { list.remove(); });
      }
      if (takes) {
        shown += 1;
        box.querySelectorAll("input, select").forEach(function (input) { showDefault(input, term, fresh); });
      }
    });
    row.querySelector("[data-no-params]").hidden = term === "" || shown > 0;
    var schedule = row.querySelector("select[name$='-weight_schedule']");
    var end = row.querySelector("[data-end-weight]");
    if (schedule && end) setShown(end, schedule.value !== "");
  }

  function wireRow(row, rows, total) {
    row.addEventListener("change", function (event) {
      var name = event.target.name || "";
      if (/-name$/.test(name)) updateRow(row, true);
      else if (/-weight_schedule$/.test(name)) updateRow(row, false);
    });
    var remove = row.querySelector("[data-remove-term]");
    if (remove) {
      remove.hidden = false;
      remove.addEventListener("click", function () {
        // Emptied and hidden, the row is sent as a row without a term, which the server skips.
        row.querySelectorAll("input, select").forEach(function (input) {
          input.disabled = false;
          if (input.type === "checkbox") input.checked = input.defaultChecked;
          else if (input.tagName === "SELECT") input.value = "";
          else if (input.type !== "hidden") input.value = "";
        });
        row.hidden = true;
        row.dispatchEvent(new CustomEvent("term-removed", { bubbles: true }));
        if (!visibleRows(rows).length) addRow(rows, total);
      });
    }
    updateRow(row, false);
  }

  function visibleRows(rows) {
    return Array.prototype.filter.call(rows.querySelectorAll("[data-term-row]"), function (row) {
      return !row.hidden;
    });
  }

  function addRow(rows, total) {
    var template = document.getElementById("term-row-template");
    var index = Number(total.value);
    var holder = document.createElement("div");
    holder.innerHTML = template.innerHTML.replace(/__prefix__/g, String(index));
    var row = holder.querySelector("[data-term-row]");
    rows.appendChild(row);
    total.value = String(index + 1);
    wireRow(row, rows, total);
    return row;
  }

  function recipeForm() {
    var form = document.querySelector("form[data-recipe-form]");
    if (!form) return;
    var rows = form.querySelector("[data-term-rows]");
    var total = form.querySelector("input[name='terms-TOTAL_FORMS']");
    var add = form.querySelector("[data-add-term]");
    var max = Number(rows.dataset.max) || 8;

    // The page's spare empty rows are the no-script fallback; with the script, "+ add term" adds rows.
    var all = rows.querySelectorAll("[data-term-row]");
    for (var i = all.length - 1; i > 0; i--) {
      if (termOf(all[i]) !== "" || all[i].querySelector(".errorlist")) break;
      all[i].remove();
      total.value = String(i);
    }
    rows.querySelectorAll("[data-term-row]").forEach(function (row) { wireRow(row, rows, total); });

    function updateAdd() { add.disabled = visibleRows(rows).length >= max; }
    add.hidden = false;
    updateAdd();
    rows.addEventListener("term-removed", updateAdd);
    add.addEventListener("click", function () {
      if (visibleRows(rows).length >= max) return;
      var row = addRow(rows, total);
      updateAdd();
      row.querySelector("select[name$='-name']").focus();
    });

    var scheme = form.querySelector("select[name='scheme']");
    function updateScheme() {
      var chosen = scheme ? scheme.value : "";
      form.querySelectorAll("[data-scheme-param]").forEach(function (box) {
        var takes = box.dataset.schemes.split(" ").indexOf(chosen) !== -1;
        setShown(box, takes);
        if (takes) box.querySelectorAll("input").forEach(function (input) { showDefault(input, chosen, false); });
      });
    }
    if (scheme) scheme.addEventListener("change", updateScheme);
    updateScheme();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", recipeForm);
  else recipeForm();
})();
