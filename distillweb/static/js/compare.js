/* distillweb: picking runs to compare in a runs table. The page works without this file (the form then sends
 * ?runs=1&runs=2, which the compare page reads too).
 *
 * - keeps ticked runs ticked when the live refresh swaps in a new runs table
 * - says how many runs are ticked, and sends them as /compare/?runs=1,2,3
 */
(function () {
  "use strict";

  if (window.__distillwebCompare) return; // loaded once per page, whatever includes it
  window.__distillwebCompare = true;

  var MAX_RUNS = 50; // experiments.forms_compare.MAX_COMPARE_RUNS
  var selected = [];

  function boxes() {
    return document.querySelectorAll("input[data-compare-run]");
  }

  function setText(el, text) {
    if (el.textContent !== text) el.textContent = text; // unchanged text must not wake the observer again
  }

  function sync() {
    boxes().forEach(function (box) {
      box.checked = selected.indexOf(box.value) !== -1; // a property: no DOM mutation
    });
    if (!selected.length) return;
    document.querySelectorAll("[data-compare-count]").forEach(function (el) {
      var text = selected.length + " run" + (selected.length === 1 ? "" : "s") + " selected";
      if (selected.length > MAX_RUNS) text += " (at most " + MAX_RUNS + " can be compared)";
      setText(el, text);
    });
  }

  document.addEventListener("change", function (event) {
    var box = event.target;
    if (!box.matches || !box.matches("input[data-compare-run]")) return;
    var at = selected.indexOf(box.value);
    if (box.checked && at === -1) selected.push(box.value);
    if (!box.checked && at !== -1) selected.splice(at, 1);
    sync();
  });

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form.matches || !form.matches("form[data-compare-form]")) return;
    event.preventDefault();
    if (!selected.length) {
      document.querySelectorAll("[data-compare-count]").forEach(function (el) {
        setText(el, "Tick at least one run first.");
      });
      return;
    }
    window.location.assign(form.action + "?runs=" + selected.join(","));
  });

  function start() {
    boxes().forEach(function (box) {
      if (box.checked && selected.indexOf(box.value) === -1) selected.push(box.value); // restored by "back"
    });
    new MutationObserver(sync).observe(document.body, { childList: true, subtree: true });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
