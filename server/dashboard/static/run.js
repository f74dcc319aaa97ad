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

  // One tick per round up to 40 rounds; beyond that Plotly picks the spacing (labels overprinted).
  function roundAxis(title, rounds) {
    const axis = { title: { text: title }, rangemode: "tozero" };
    if (rounds <= 40) axis.dtick = 1;
    else axis.nticks = 20;
    return axis;
  }

  function nRounds(d) { return d.rounds.length; }

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
      xaxis: roundAxis("server round (0 = untrained model)", nRounds(d)),
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

  // Lifetime ε (all runs) is what a site's budget bounds: solid, against the budget lines;
  // the share this run spent is dotted in the same legend group.
  const palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                   "#7f7f7f", "#bcbd22", "#17becf"];
  function drawPrivacy(d) {
    if (!d.privacy.length) return;
    const traces = [];
    d.privacy.forEach(function (s, i) {
      const color = palette[i % palette.length];
      const lifetime = s.epsilon_lifetime && s.epsilon_lifetime.length ? s.epsilon_lifetime : s.epsilon_run;
      traces.push({ type: "scatter", mode: "lines", x: s.server_rounds, y: lifetime,
                    name: esc(s.site_id), legendgroup: esc(s.site_id), line: { color: color },
                    hovertemplate: "round %{x}: lifetime ε = %{y:.3f}<extra>%{fullData.name}</extra>" });
      traces.push({ type: "scatter", mode: "lines", x: s.server_rounds, y: s.epsilon_run,
                    name: esc(s.site_id) + " (this run)", legendgroup: esc(s.site_id), showlegend: false,
                    line: { color: color, dash: "dot", width: 1 },
                    hovertemplate: "round %{x}: ε this run = %{y:.3f}<extra>%{fullData.name}</extra>" });
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
      xaxis: roundAxis("server round", nRounds(d)),
      yaxis: { title: { text: "lifetime ε (dotted: this run)" }, rangemode: "tozero" },
      shapes: shapes,
    }), config);
  }

  function drawDrift(d) {
    const m = d.drift;
    if (!m.sites.length) return;
    const x = m.server_rounds.map(function (r) { return "round " + r; });
    const text = m.scores.map(function (row) {
      return row.map(function (v) { return v === null ? "" : v.toFixed(2); });
    });
    Plotly.react(sized("chart-drift", Math.max(200, 80 + 40 * m.sites.length)), [{
      type: "heatmap", z: m.scores, x: x, y: m.sites.map(esc), text: text, texttemplate: "%{text}",
      zmin: 0, zmax: 2, colorscale: [[0, "#e8f5e9"], [0.5, "#fff59d"], [1, "#c62828"]],
      hovertemplate: "%{y}, %{x}: score %{z:.2f}<extra></extra>",
    }], layout({
      margin: { l: 90, r: 30, t: 10, b: 40 },
      yaxis: { autorange: "reversed", type: "category" },
      xaxis: { type: "category" },
    }), config);
    const list = document.getElementById("drift-alerts");
    const items = m.task_starts.filter(function (t) { return t.trigger !== "scheduled"; }).map(function (t) {
      return '<li class="task-start">task ' + t.task_index + " began at round " + t.server_round + ": " + esc(t.reason) + "</li>";
    }).concat(m.alerts.map(function (a) {
      return '<li class="drift-alert">round ' + a.server_round + ": " + esc(a.site_id) +
        (a.alert ? " drift (score " + (a.score || 0).toFixed(2) + ")" : "") +
        (a.rate_alert ? " class rate moved by " + (a.rate_shift || 0).toFixed(3) : "") + "</li>";
    }));
    list.innerHTML = items.join("");
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
    const label = function (o) { return "task " + o.task_index + (o.kind === "consolidate" ? " (consolidation)" : o.kind === "monitor" ? " (monitoring)" : "") + ", " + o.status; };
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
      xaxis: roundAxis("server round", nRounds(d)),
      yaxis: { title: { text: "sites" }, rangemode: "tozero" },
      yaxis2: { title: { text: "seconds" }, overlaying: "y", side: "right", rangemode: "tozero", showgrid: false },
      shapes: taskLines(d.task_boundaries),
    }), config);
    // Failures grouped by cause (status, phase, error): one line each, not one per site-round.
    const list = document.getElementById("incidents");
    list.replaceChildren();
    const failedRounds = r.filter(function (o) { return o.status === "failed"; }).map(function (o) { return o.server_round; });
    if (failedRounds.length) {
      const li = document.createElement("li");
      li.className = "failed";
      li.textContent = "Round" + (failedRounds.length > 1 ? "s " : " ") + roundList(failedRounds) + " failed";
      list.appendChild(li);
    }
    (d.failures || []).forEach(function (g) {
      const li = document.createElement("li");
      li.className = g.status;
      li.textContent = g.status + " (" + g.phase + ") ×" + g.count + ": " + g.sites.join(", ") +
        " in round" + (g.server_rounds.length > 1 ? "s " : " ") + roundList(g.server_rounds) +
        (g.detail ? ": " + g.detail : "");
      list.appendChild(li);
    });
  }

  function roundList(rounds) {
    if (rounds.length <= 8) return rounds.join(", ");
    return rounds.slice(0, 8).join(", ") + " … " + rounds[rounds.length - 1];
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
      xaxis: roundAxis("server round", nRounds(d)),
      yaxis: { title: { text: "bytes" }, rangemode: "tozero", tickformat: "~s" },
    }), config);
  }

  function signedPct(v) { return v === null || v === undefined ? "–" : (v >= 0 ? "+" : "") + (100 * v).toFixed(1) + " pp"; }

  function fact(name, text) {
    const el = document.querySelector('#run-facts [data-fact="' + name + '"]');
    if (el) el.textContent = text;
  }

  // The header follows the run: badge (stale, degraded), rounds, ACC/BWT/FWT, ε, hash, alerts.
  function drawStatus(d) {
    const run = d.run;
    const badge = document.querySelector("#run-status .badge");
    if (badge) {
      if (run.health === "stale") {
        const minutes = Math.round((run.idle_seconds || 0) / 60);
        badge.textContent = "stale · silent " + minutes + " min";
        badge.className = "badge badge-stale";
      } else if (run.health === "degraded") {
        badge.textContent = "degraded · " + run.lost_site_rounds + " site-rounds lost";
        badge.className = "badge badge-degraded badge-completed-lost";
      } else {
        badge.textContent = run.status;
        badge.className = "badge badge-" + run.status;
      }
    }
    const failed = d.rounds.filter(function (o) { return o.status === "failed"; }).length;
    fact("rounds", run.rounds_completed + " completed" + (failed ? ", " + failed + " failed" : ""));
    fact("acc", run.avg_accuracy === null ? "–" : pct(run.avg_accuracy));
    fact("bwt", signedPct(run.bwt));
    fact("fwt", signedPct(run.fwt));
    fact("epsilon", run.epsilon === null || run.epsilon === undefined ? "–" : run.epsilon.toFixed(2));
    const h = d.model_hash;
    fact("hash", !h ? "not checked" : h.rounds_agreed === h.rounds_checked
      ? "all sites agreed (" + h.rounds_checked + " rounds)"
      : "sites disagreed in " + (h.rounds_checked - h.rounds_agreed) + " of " + h.rounds_checked + " rounds");
    const reason = document.getElementById("run-reason");
    if (reason) {
      reason.textContent = run.reason ? "Reason: " + run.reason : "";
      reason.hidden = !run.reason;
    }
    const alerts = document.getElementById("alerts");
    if (alerts) {
      alerts.replaceChildren();
      (d.alerts || []).forEach(function (a) {
        const li = document.createElement("li");
        li.className = "alert alert-" + a.severity;
        li.dataset.kind = a.kind;
        li.textContent = a.message;
        alerts.appendChild(li);
      });
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
    show("panel-drift", d.drift.sites.length > 0);
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
    drawDrift(d);
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
