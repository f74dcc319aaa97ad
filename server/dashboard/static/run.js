// Run page: draws the panels with Plotly from /api/runs/{id}/charts and, while the run is
// running, polls that endpoint and redraws in place with Plotly.react (no page reloads).
// Loaded as a file (not inline) so the page's Content-Security-Policy can forbid inline scripts.
(function () {
  "use strict";

  const root = document.getElementById("run-page");
  if (!root || typeof Plotly === "undefined") return;
  const chartsUrl = root.dataset.chartsUrl;
  const pollMs = Math.max(1000, Number(root.dataset.pollMs) || 5000);
  const config = { displaylogo: false, responsive: true };
  const font = { family: "system-ui, -apple-system, Segoe UI, sans-serif", size: 12 };
  const colors = { ok: "#2e7d32", failed: "#c62828", refused: "#ef6c00", seconds: "#455a64" };

  function layout(extra) {
    return Object.assign(
      { margin: { l: 60, r: 30, t: 10, b: 95 }, font: font,
        legend: { orientation: "h", x: 0, y: -0.3, yanchor: "top", traceorder: "normal" },
        hovermode: "closest" },
      extra);
  }

  // Charts take their container's size (layout.autosize), so the page's grid and Plotly agree.
  function sized(id, height) {
    const el = document.getElementById(id);
    el.style.height = height + "px";
    return el;
  }

  function show(id, visible) {
    const el = document.getElementById(id);
    if (el) el.hidden = !visible;
  }

  // Plotly renders names, hover text and labels as (a subset of) HTML: site ids and task names
  // come from the sites and the experiment, so they are escaped before they reach it.
  function esc(value) {
    return String(value).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }

  function pct(v) { return v === null || v === undefined ? "" : (100 * v).toFixed(1) + "%"; }

  function taskLines(bounds) {
    return bounds.map(function (x) {
      return { type: "line", x0: x - 0.5, x1: x - 0.5, yref: "paper", y0: 0, y1: 1,
               line: { dash: "dot", color: "#9e9e9e", width: 1 } };
    });
  }

  function drawAccuracy(d) {
    const traces = d.accuracy.map(function (s) {
      return { type: "scatter", mode: "lines+markers", x: s.server_rounds, y: s.values,
               name: "task " + s.task_index + ": " + esc(s.task),
               hovertemplate: "round %{x}: %{y:.1%}<extra>%{fullData.name}</extra>" };
    });
    if (!traces.length) return;
    Plotly.react(sized("chart-accuracy", 340), traces, layout({
      xaxis: { title: { text: "server round (0 = untrained model)" }, dtick: 1, rangemode: "tozero" },
      yaxis: { title: { text: "federation accuracy" }, tickformat: ".0%", range: [0, 1.02] },
      shapes: taskLines(d.task_boundaries),
    }), config);
  }

  function drawMatrix(d) {
    const m = d.matrix;
    const filled = m.matrix.some(function (row) { return row.some(function (v) { return v !== null; }); });
    if (!filled) return;
    const y = m.matrix.map(function (_, i) { return "after task " + i; });
    const x = m.eval_tasks.map(function (_, j) { return "task " + j; });
    const text = m.matrix.map(function (row) { return row.map(pct); });
    Plotly.react(sized("chart-matrix", Math.max(240, 90 + 55 * y.length)), [{
      type: "heatmap", z: m.matrix, x: x, y: y, text: text, texttemplate: "%{text}",
      zmin: 0, zmax: 1, colorscale: "Viridis", colorbar: { tickformat: ".0%" },
      hovertemplate: "%{y}, on %{x}: %{z:.1%}<extra></extra>",
    }], layout({
      margin: { l: 100, r: 30, t: 10, b: 40 },
      yaxis: { autorange: "reversed", type: "category" },
      xaxis: { type: "category", side: "bottom" },
    }), config);
  }

  function drawPrivacy(d) {
    if (!d.privacy.length) return;
    const traces = d.privacy.map(function (s) {
      return { type: "scatter", mode: "lines+markers", x: s.server_rounds, y: s.epsilon_run,
               name: esc(s.site_id), hovertemplate: "round %{x}: ε = %{y:.3f}<extra>%{fullData.name}</extra>" };
    });
    // One dashed line per distinct budget, labelled with the sites that reported it.
    const budgets = {};
    d.privacy.forEach(function (s) {
      if (s.budget !== null) (budgets[s.budget] = budgets[s.budget] || []).push(s.site_id);
    });
    const shapes = Object.keys(budgets).map(function (b) {
      return { type: "line", xref: "paper", x0: 0, x1: 1, y0: Number(b), y1: Number(b),
               line: { dash: "dash", width: 1, color: "#c62828" },
               label: { text: "budget " + budgets[b].map(esc).join(", "), textposition: "start",
                        yanchor: "bottom", font: { size: 10, color: "#c62828" } } };
    });
    Plotly.react(sized("chart-privacy", 340), traces, layout({
      xaxis: { title: { text: "server round" }, dtick: 1 },
      yaxis: { title: { text: "ε spent in this run" }, rangemode: "tozero" },
      shapes: shapes,
    }), config);
  }

  // Sites with this status in the phases that count for a round (train, consolidate).
  function sitesWith(round, status) {
    const sites = round.participations
      .filter(function (p) { return p.phase !== "evaluate"; })
      .filter(function (p) { return p.status === status || (status === "failed" && p.status === "rejected"); })
      .map(function (p) { return p.site_id; });
    return Array.from(new Set(sites)).sort();
  }

  function drawRounds(d) {
    const r = d.rounds;
    if (!r.length) return;
    const x = r.map(function (o) { return o.server_round; });
    const label = function (o) { return "task " + o.task_index + (o.kind === "consolidate" ? " (consolidation)" : "") + ", " + o.status; };
    const hover = function (status) {
      return r.map(function (o) {
        const sites = sitesWith(o, status);
        return label(o) + (sites.length ? "<br>" + sites.map(esc).join(", ") : "");
      });
    };
    const bar = function (name, key, color, status) {
      return { type: "bar", name: name, x: x, y: r.map(function (o) { return o[key]; }),
               marker: { color: color }, hovertext: hover(status), textposition: "none",
               hovertemplate: "round %{x}: %{y} " + name + "<br>%{hovertext}<extra></extra>" };
    };
    const traces = [
      bar("participants", "num_participants", colors.ok, "ok"),
      bar("failures", "num_failures", colors.failed, "failed"),
      bar("refusals", "num_refusals", colors.refused, "refused"),
      { type: "scatter", mode: "lines+markers", name: "seconds", x: x, yaxis: "y2",
        y: r.map(function (o) { return o.status === "running" ? null : o.seconds; }), line: { color: colors.seconds, width: 1.5 },
        hovertemplate: "round %{x}: %{y:.1f} s<extra></extra>" },
    ];
    Plotly.react(sized("chart-rounds", 340), traces, layout({
      barmode: "stack",
      margin: { l: 60, r: 60, t: 10, b: 95 },
      xaxis: { title: { text: "server round" }, dtick: 1 },
      yaxis: { title: { text: "sites" }, rangemode: "tozero", dtick: 1 },
      yaxis2: { title: { text: "seconds" }, overlaying: "y", side: "right", rangemode: "tozero", showgrid: false },
      shapes: taskLines(d.task_boundaries),
    }), config);
    const list = document.getElementById("incidents");
    list.replaceChildren();
    r.forEach(function (o) {
      if (o.status === "failed") {
        const li = document.createElement("li");
        li.className = "failed";
        li.textContent = "Round " + o.server_round + " failed";
        list.appendChild(li);
      }
      o.participations.forEach(function (p) {
        if (p.status === "ok") return;
        const li = document.createElement("li");
        li.className = p.status;
        li.textContent = "Round " + o.server_round + ": " + p.site_id + " " + p.status + " (" +
          p.phase + ")" + (p.detail ? ": " + p.detail : "");
        list.appendChild(li);
      });
    });
  }

  function drawBytes(d) {
    const r = d.rounds.filter(function (o) { return o.bytes_up > 0 || o.bytes_down > 0; });
    if (!r.length) return;
    const x = r.map(function (o) { return o.server_round; });
    Plotly.react(sized("chart-bytes", 340), [
      { type: "bar", name: "sites → coordinator", x: x, y: r.map(function (o) { return o.bytes_up; }) },
      { type: "bar", name: "coordinator → sites", x: x, y: r.map(function (o) { return o.bytes_down; }) },
    ], layout({
      barmode: "group",
      xaxis: { title: { text: "server round" }, dtick: 1 },
      yaxis: { title: { text: "bytes" }, rangemode: "tozero", tickformat: "~s" },
    }), config);
  }

  function drawStatus(d) {
    const badge = document.querySelector("#run-status .badge");
    if (badge) {
      const lost = d.run.status === "completed" && d.run.lost_site_rounds > 0;
      badge.textContent = lost ? "completed · " + d.run.lost_site_rounds + " site-rounds lost" : d.run.status;
      badge.className = "badge badge-" + (lost ? "completed-lost" : d.run.status);
    }
    show("live", d.poll);
  }

  // Which panels have data. Set before drawing anything: the grid re-flows when a panel
  // appears, and Plotly sizes a chart to its container's width at the time it draws it.
  function layoutPanels(d) {
    const matrixFilled = d.matrix.matrix.some(function (row) {
      return row.some(function (v) { return v !== null; });
    });
    show("panel-accuracy", d.accuracy.length > 0);
    show("panel-matrix", matrixFilled);
    show("panel-privacy", d.privacy.length > 0);
    show("panel-rounds", d.rounds.length > 0);
    show("panel-bytes", d.rounds.some(function (o) { return o.bytes_up > 0 || o.bytes_down > 0; }));
    show("no-data", d.rounds.length === 0);
  }

  function draw(d) {
    drawStatus(d);
    layoutPanels(d);
    drawAccuracy(d);
    drawMatrix(d);
    drawPrivacy(d);
    drawRounds(d);
    drawBytes(d);
    document.body.dataset.rendered = String(Number(document.body.dataset.rendered || 0) + 1);
  }

  // Keep charts fitted to their panels when the grid re-flows (a panel appears, the window
  // narrows); Plotly's own "responsive" option only listens to window resizes.
  if (typeof ResizeObserver !== "undefined") {
    const observer = new ResizeObserver(function (entries) {
      entries.forEach(function (entry) {
        const chart = entry.target;
        if (chart.data && chart.offsetParent !== null) Plotly.Plots.resize(chart);
      });
    });
    document.querySelectorAll(".chart").forEach(function (el) { observer.observe(el); });
  }

  function poll() {
    fetch(chartsUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (resp) {
        if (resp.status === 401) {
          window.location.assign("/login?next=" + encodeURIComponent(window.location.pathname));
          return null;
        }
        return resp.ok ? resp.json() : null;
      })
      .then(function (d) {
        if (d) draw(d);
        if (!d || d.poll) window.setTimeout(poll, pollMs);
      })
      .catch(function () { window.setTimeout(poll, pollMs); });
  }

  const initial = JSON.parse(document.getElementById("charts-data").textContent);
  draw(initial);
  if (initial.poll) window.setTimeout(poll, pollMs);
})();
