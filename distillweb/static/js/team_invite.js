/* The team page's "Copy link" button for a new invite link (the page works without this file: the link is in a
 * read-only field that selects itself on focus). */
(function () {
  "use strict";

  function copy(button) {
    var field = document.getElementById(button.dataset.copyFrom);
    if (!field) return;
    var done = function () {
      button.textContent = "Copied";
    };
    field.focus();
    field.select();
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(field.value).then(done, function () {
        button.textContent = "Press Ctrl+C to copy";
      });
    } else {
      button.textContent = "Press Ctrl+C to copy";
    }
  }

  document.querySelectorAll("button[data-copy-from]").forEach(function (button) {
    button.addEventListener("click", function () {
      copy(button);
    });
  });
})();
