// cxrsynth console: live job progress by polling /console/jobs/status (plain JavaScript, no library).
// Rows and panels marked data-job-id + data-active="true" are updated in place; nothing else changes,
// so keyboard focus stays where it is. A finished job is announced in the page's live region.
// On a job page the events table (tbody[data-events]) follows the job too: each tick also asks its
// data-events URL for the lines after data-last-event-id, until the endpoint says the job is done.
(function () {
  "use strict";
  var POLL_MS = 1500;
  var RETRIES = 5;
  var base = "/console/jobs/status";
  var failures = 0;
  var events = null;  // the followed events tbody; null when there is none or its job has finished
  var eventsMax = 200;

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

  function getJson(url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (res) {
        var type = res.headers.get("content-type") || "";
        if (res.redirected || type.indexOf("text/html") >= 0) {
          failures = RETRIES;  // the session ended (login page): polling again cannot help
        }
        if (!res.ok || type.indexOf("application/json") < 0) throw new Error("status " + res.status);
        return res.json();
      });
  }

  // "2025-01-31 14:05:09 UTC", as the server's `when` filter prints the rows it renders.
  function formatTime(iso) {
    var d = new Date(iso);
    return isNaN(d.getTime()) ? String(iso) : d.toISOString().slice(0, 19).replace("T", " ") + " UTC";
  }

  function addEvent(e) {
    if (e.id <= (Number(events.getAttribute("data-last-event-id")) || 0)) return;  // already shown
    var empty = events.querySelector("td.empty");
    if (empty) empty.parentNode.remove();
    var tr = document.createElement("tr");
    var step = e.total ? (e.step === null ? "" : e.step) + "/" + e.total : "";
    [[formatTime(e.created_at), "small"], [e.level, ""], [e.message, ""], [step, "num"]].forEach(function (cell) {
      var td = document.createElement("td");
      if (cell[1]) td.className = cell[1];
      td.textContent = cell[0];  // text, never markup: messages come from the server
      tr.appendChild(td);
    });
    events.appendChild(tr);
    events.setAttribute("data-last-event-id", String(e.id));
    while (events.rows.length > eventsMax) events.deleteRow(0);
  }

  function pollEvents() {
    var after = events.getAttribute("data-last-event-id") || "0";
    return getJson(events.getAttribute("data-events") + "?after=" + encodeURIComponent(after))
      .then(function (body) {
        body.events.forEach(addEvent);
        // Inactive (status read before the events) and not cut at the cap: every line is shown.
        if (!body.active && body.events.length < eventsMax) {
          events = null;
          setText(document, "[data-events-note]", "The job has finished.");
        }
      });
  }

  function poll() {
    var ids = activeIds();
    if (!ids.length && !events) return;
    var query = ids.map(function (id) { return "id=" + encodeURIComponent(id); }).join("&");
    var status = ids.length ? getJson(base + "?" + query) : Promise.resolve({ jobs: [] });
    status
      .then(function (body) {
        body.jobs.forEach(update);
        // After the status: the tick that sees the job finish still fetches its last lines.
        return events ? pollEvents() : null;
      })
      .then(function () {
        failures = 0;
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
    var table = document.querySelector("tbody[data-events]");
    var panel = table && document.querySelector('[data-job-id][data-active="true"]');
    if (panel) {
      events = table;
      eventsMax = Number(table.getAttribute("data-events-max")) || eventsMax;
    }
    if (activeIds().length) window.setTimeout(poll, POLL_MS);
    var firstError = document.querySelector('[aria-invalid="true"]');
    if (firstError) firstError.focus();
  });
})();
