// Hand-written SVG line charts for the nonstop dashboard: no library, no
// network. NonstopCharts.render(plot, options) draws one chart into the
// element `plot`:
//   options.series:  [{name, color, values: [number|null]}], one value per point
//   options.startMs, options.stepMs: when the first point starts, their spacing
//   options.markers: [{atMs, kind: "deploy"|"ok"|"bad"|"scale"|"maint", text}]
//   options.format:  value -> text (axis labels and the cursor read-out)
// The <svg> it draws carries data-points (non-empty points drawn) and
// data-markers (markers inside the range), for tests and people alike.
"use strict";
(function () {
  const NS = "http://www.w3.org/2000/svg";
  const W = 600, H = 170, L = 46, R = 8, T = 8, B = 22;

  function el(name, attrs, parent) {
    const e = document.createElementNS(NS, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }

  // A "nice" upper bound and tick step for the y axis.
  function niceScale(max) {
    if (!(max > 0)) return { top: 1, step: 0.25 };
    const rough = max / 4;
    const mag = Math.pow(10, Math.floor(Math.log10(rough)));
    const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= rough);
    return { top: step * Math.ceil(max / step), step };
  }

  function clock(ms, withSeconds) {
    const d = new Date(ms);
    const p = n => String(n).padStart(2, "0");
    return p(d.getHours()) + ":" + p(d.getMinutes()) + (withSeconds ? ":" + p(d.getSeconds()) : "");
  }

  function render(plot, o) {
    const n = Math.max(0, ...o.series.map(s => s.values.length));
    const fmt = o.format || (v => String(Math.round(v * 100) / 100));
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img" });
    svg.setAttribute("aria-label", o.title || "chart");
    const endMs = o.startMs + n * o.stepMs;
    const x = ms => L + ((ms - o.startMs) / Math.max(1, endMs - o.startMs)) * (W - L - R);
    let max = 0, points = 0;
    for (const s of o.series) for (const v of s.values) if (v != null) { max = Math.max(max, v); points++; }
    if (o.minTop) max = Math.max(max, o.minTop);
    const { top, step } = niceScale(max);
    const y = v => T + (1 - v / top) * (H - T - B);

    for (let v = 0; v <= top + step / 2; v += step) {
      el("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: v === 0 ? "axis" : "gridline" }, svg);
      el("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end" }, svg).textContent = fmt(v);
    }
    const ticks = 4;
    for (let i = 0; i <= ticks; i++) {
      const ms = o.startMs + ((endMs - o.startMs) * i) / ticks;
      const anchor = i === 0 ? "start" : i === ticks ? "end" : "middle";
      el("text", { x: x(ms), y: H - 6, "text-anchor": anchor }, svg).textContent = clock(ms, o.stepMs < 60000);
    }

    // Markers under the lines.
    let markers = 0;
    for (const m of o.markers || []) {
      if (m.atMs < o.startMs || m.atMs > endMs) continue;
      markers++;
      const line = el("line", { x1: x(m.atMs), x2: x(m.atMs), y1: T, y2: H - B, class: "marker " + m.kind }, svg);
      el("title", {}, line).textContent = clock(m.atMs, true) + " " + m.text;
    }

    // One path per series; a gap where nothing was measured; a lone point
    // between gaps as a dot.
    for (const s of o.series) {
      let d = "", run = 0;
      s.values.forEach((v, i) => {
        const px = x(o.startMs + (i + 0.5) * o.stepMs);
        if (v == null) { run = 0; return; }
        d += (run === 0 ? "M" : "L") + px.toFixed(1) + " " + y(v).toFixed(1) + " ";
        run++;
        const next = s.values[i + 1];
        if (run === 1 && (next == null)) el("circle", { cx: px, cy: y(v), r: 2, fill: s.color }, svg);
      });
      if (d) {
        const path = el("path", { d, class: "series", stroke: s.color }, svg);
        el("title", {}, path).textContent = s.name;
      }
    }
    if (points === 0) {
      el("text", { x: (L + W - R) / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, svg).textContent =
        "no data in this range";
    }

    // A cursor that reads the values under the pointer.
    const cursor = el("line", { x1: 0, x2: 0, y1: T, y2: H - B, class: "cursor", visibility: "hidden" }, svg);
    const readout = el("text", { x: W - R, y: T + 10, "text-anchor": "end" }, svg);
    svg.addEventListener("mousemove", ev => {
      const box = svg.getBoundingClientRect();
      const vx = ((ev.clientX - box.left) / box.width) * W;
      const i = Math.floor(((vx - L) / (W - L - R)) * n);
      if (i < 0 || i >= n) { cursor.setAttribute("visibility", "hidden"); readout.textContent = ""; return; }
      const cx = x(o.startMs + (i + 0.5) * o.stepMs);
      cursor.setAttribute("x1", cx); cursor.setAttribute("x2", cx); cursor.setAttribute("visibility", "visible");
      const parts = o.series.map(s => s.name + " " + (s.values[i] == null ? "–" : fmt(s.values[i])));
      readout.textContent = clock(o.startMs + i * o.stepMs, true) + "  " + parts.join("  ");
    });
    svg.addEventListener("mouseleave", () => { cursor.setAttribute("visibility", "hidden"); readout.textContent = ""; });

    svg.dataset.points = String(points);
    svg.dataset.markers = String(markers);
    plot.replaceChildren(svg);
    if (o.series.length > 1 || o.legend) {
      const legend = document.createElement("div");
      legend.className = "series-legend";
      for (const s of o.series) {
        const item = document.createElement("span");
        const swatch = document.createElement("i");
        swatch.style.background = s.color;
        item.append(swatch, s.name);
        legend.append(item);
      }
      plot.append(legend);
    }
    return { points, markers };
  }

  window.NonstopCharts = { render, niceScale };
})();
