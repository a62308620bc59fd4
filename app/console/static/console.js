// cxrsynth console: live job progress by polling /console/jobs/status (plain JavaScript, no library).
// Rows and panels marked data-job-id + data-active="true" are updated in place; nothing else changes,
// so keyboard focus stays where it is. A finished job is announced in the page's live region.
(function () {
  "use strict";
  var POLL_MS = 1500;
  var RETRIES = 5;
  var base = "/console/jobs/status";
  var failures = 0;

  function activeIds() {
    var ids = [];
    document.querySelectorAll('[data-job-id][data-active="true"]').forEach(function (el) {
      var id = el.getAttribute("data-job-id");
      if (ids.indexOf(id) < 0) ids.push(id);
    });
    return ids;
  }

  function announce(text) {
    var live = document.getElementById("live-region");
    if (live) live.textContent = text;
  }

  function setText(root, selector, text) {
    root.querySelectorAll(selector).forEach(function (el) { el.textContent = text; });
  }

  function update(job) {
    document.querySelectorAll('[data-job-id="' + job.id + '"]').forEach(function (root) {
      root.querySelectorAll("[data-status]").forEach(function (el) {
        el.textContent = job.status;
        el.className = "status status-" + job.status;
      });
      root.querySelectorAll("[data-progress]").forEach(function (el) {
        el.value = job.percent;
        el.textContent = job.percent + "%";
      });
      setText(root, "[data-percent]", job.percent + "%");
      setText(root, "[data-message]", job.message || "");
      if (!job.active) {
        root.setAttribute("data-active", "false");
        root.querySelectorAll("[data-cancel]").forEach(function (el) { el.remove(); });
        root.querySelectorAll("[data-result]").forEach(function (el) {
          if (job.dataset_url && !el.querySelector("a")) {
            var a = document.createElement("a");
            a.href = job.dataset_url;
            a.textContent = el.closest("tr") ? "Dataset" : "Open the dataset";
            if (!el.closest("tr")) a.className = "button button-primary";
            el.textContent = "";
            el.appendChild(a);
          } else if (job.error && !el.textContent.trim()) {
            el.textContent = job.error;
          }
        });
        announce("Job " + job.id.slice(0, 8) + " " + job.status + ".");
      } else if (job.cancel_requested) {
        root.querySelectorAll("[data-cancel] button").forEach(function (b) {
          b.disabled = true;
          b.textContent = "Cancel requested";
        });
      }
    });
  }

  function poll() {
    var ids = activeIds();
    if (!ids.length) return;
    var query = ids.map(function (id) { return "id=" + encodeURIComponent(id); }).join("&");
    fetch(base + "?" + query, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (res) {
        var type = res.headers.get("content-type") || "";
        if (res.redirected || type.indexOf("text/html") >= 0) {
          failures = RETRIES;  // the session ended (login page): polling again cannot help
        }
        if (!res.ok || type.indexOf("application/json") < 0) throw new Error("status " + res.status);
        return res.json();
      })
      .then(function (body) {
        failures = 0;
        body.jobs.forEach(update);
        window.setTimeout(poll, POLL_MS);
      })
      .catch(function () {
        failures += 1;
        if (failures < RETRIES) {
          window.setTimeout(poll, POLL_MS * Math.pow(2, failures));
        } else {
          announce("Live progress paused; reload the page to see the latest state.");
        }
      });
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (activeIds().length) window.setTimeout(poll, POLL_MS);
    var firstError = document.querySelector('[aria-invalid="true"]');
    if (firstError) firstError.focus();
  });
})();
