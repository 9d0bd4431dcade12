// The page's plots, drawn here with plain SVG and canvas (no charting library): samples of a
// 2-D model over its density, a matrix of pairwise scatters for more dimensions, a grid of
// sampled images, and histograms (of scores, with the calibrated threshold).

const NS = "http://www.w3.org/2000/svg";
const FLOOR = 1e29; // scores at or above this are the service's log-likelihood floor (1e30)

function el(tag, attrs = {}, parent = null, text = null) {
  const node = document.createElementNS(NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== null) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function canvasOf(width, height, label) {
  const svg = el("svg", {viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label});
  return svg;
}

/** Round numbers for an axis: about `count` ticks covering [lo, hi]. */
function ticks(lo, hi, count = 5) {
  const span = hi - lo || 1;
  const raw = span / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) {
    out.push(Math.abs(v) < step * 1e-9 ? 0 : v);
  }
  return out;
}

function label(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(1);
  return String(Number(v.toPrecision(4)));
}

/** [min, max] of `values` (a loop: spreading 100 000 arguments overflows the stack). */
function minMax(values) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of values) {
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  return [lo, hi];
}

/** Linear map of [d0, d1] onto [r0, r1]. */
function scale(d0, d1, r0, r1) {
  const k = (r1 - r0) / ((d1 - d0) || 1);
  return (v) => r0 + (v - d0) * k;
}

/** The rectangle [x0, x1] x [y0, y1] holding `points` (rows of at least 2 numbers), padded. */
export function extent(points, pad = 0.1) {
  let [x0, x1, y0, y1] = [Infinity, -Infinity, Infinity, -Infinity];
  for (const p of points) {
    x0 = Math.min(x0, p[0]); x1 = Math.max(x1, p[0]);
    y0 = Math.min(y0, p[1]); y1 = Math.max(y1, p[1]);
  }
  const dx = (x1 - x0) || 1;
  const dy = (y1 - y0) || 1;
  return {x0: x0 - pad * dx, x1: x1 + pad * dx, y0: y0 - pad * dy, y1: y1 + pad * dy};
}

/** The centres of a side x side grid over `box`, row by row from the bottom. */
export function gridOver(box, side) {
  const rows = [];
  const dx = (box.x1 - box.x0) / side;
  const dy = (box.y1 - box.y0) / side;
  for (let j = 0; j < side; j++) {
    for (let i = 0; i < side; i++) rows.push([box.x0 + (i + 0.5) * dx, box.y0 + (j + 0.5) * dy]);
  }
  return rows;
}

const VIRIDIS = ["#440154", "#482878", "#3e4a89", "#31688e", "#26828e", "#1f9e89", "#35b779",
  "#6ece58", "#b5de2b", "#fde725"].map((h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)));

function viridis(t) {
  const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const f = x - i;
  const c = VIRIDIS[i].map((a, k) => Math.round(a + (VIRIDIS[i + 1][k] - a) * f));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function axes(svg, box, area, xName, yName) {
  const px = scale(box.x0, box.x1, area.left, area.right);
  const py = scale(box.y0, box.y1, area.bottom, area.top);
  el("rect", {class: "frame", x: area.left, y: area.top, width: area.right - area.left,
    height: area.bottom - area.top}, svg);
  for (const v of ticks(box.x0, box.x1)) {
    el("line", {class: "axis", x1: px(v), x2: px(v), y1: area.bottom, y2: area.bottom + 4}, svg);
    el("text", {x: px(v), y: area.bottom + 16, "text-anchor": "middle"}, svg, label(v));
  }
  for (const v of ticks(box.y0, box.y1)) {
    el("line", {class: "axis", x1: area.left - 4, x2: area.left, y1: py(v), y2: py(v)}, svg);
    el("text", {x: area.left - 7, y: py(v) + 4, "text-anchor": "end"}, svg, label(v));
  }
  if (xName) {
    el("text", {x: (area.left + area.right) / 2, y: area.bottom + 32, "text-anchor": "middle"},
      svg, xName);
  }
  if (yName) {
    el("text", {x: 12, y: (area.top + area.bottom) / 2, "text-anchor": "middle",
      transform: `rotate(-90 12 ${(area.top + area.bottom) / 2})`}, svg, yName);
  }
  return {px, py};
}

/** Samples of a 2-D model as points, over its density when `density` is given:
 * `{side, values}` (log-likelihoods of `gridOver(box, side)`). */
export function scatter2d(container, samples, box, density = null) {
  const svg = canvasOf(620, 470, "samples" + (density ? " over the model's density" : ""));
  svg.id = "sample-svg";
  const area = {left: 56, right: 510, top: 14, bottom: 420};
  const {px, py} = axes(svg, box, area, "x₀", "x₁");
  if (density) drawDensity(svg, box, area, density, px, py);
  const points = el("g", {class: "points"}, svg);
  for (const [x, y] of samples) {
    el("circle", {class: density ? "sample on-density" : "sample", cx: px(x).toFixed(1),
      cy: py(y).toFixed(1), r: 2.2}, points);
  }
  container.replaceChildren(svg);
}

function drawDensity(svg, box, area, density, px, py) {
  const {side, values} = density;
  const finite = values.filter((v) => Number.isFinite(v) && v > -FLOOR);
  const vmax = minMax(finite)[1];
  const sorted = [...finite].sort((a, b) => a - b);
  const vmin = Math.max(sorted[Math.floor(0.02 * (sorted.length - 1))], vmax - 15);
  const dx = (box.x1 - box.x0) / side;
  const dy = (box.y1 - box.y0) / side;
  const cells = el("g", {class: "density", "data-cells": values.length}, svg);
  const w = px(box.x0 + dx) - px(box.x0) + 0.6;
  const h = py(box.y0) - py(box.y0 + dy) + 0.6;
  values.forEach((v, k) => {
    const i = k % side;
    const j = Math.floor(k / side);
    el("rect", {class: "cell", x: px(box.x0 + i * dx).toFixed(2),
      y: py(box.y0 + (j + 1) * dy).toFixed(2), width: w.toFixed(2), height: h.toFixed(2),
      fill: viridis((v - vmin) / ((vmax - vmin) || 1))}, cells);
  });
  // the colour bar
  const bar = el("g", {class: "colorbar"}, svg);
  const top = area.top;
  const height = area.bottom - area.top;
  const steps = 40;
  for (let s = 0; s < steps; s++) {
    el("rect", {x: area.right + 24, y: (top + (s * height) / steps).toFixed(2), width: 14,
      height: (height / steps + 0.6).toFixed(2), fill: viridis(1 - s / steps)}, bar);
  }
  el("text", {x: area.right + 42, y: top + 10}, bar, label(vmax));
  el("text", {x: area.right + 42, y: area.bottom}, bar, `≤${label(vmin)}`);
  el("text", {x: area.right + 20, y: (top + area.bottom) / 2, "text-anchor": "middle",
    transform: `rotate(-90 ${area.right + 20} ${(top + area.bottom) / 2})`}, bar,
  "log p(x), nats");
}

/** Pairwise scatters of the first `k` dimensions (histograms on the diagonal). */
export function pairPlot(container, samples, dim, k = 4) {
  k = Math.min(dim, k);
  const size = 600;
  const margin = 34;
  const cell = (size - margin) / k;
  const svg = canvasOf(size, size, `pairwise scatters of dimensions 0 to ${k - 1}`);
  svg.id = "sample-svg";
  const ranges = [];
  for (let d = 0; d < k; d++) {
    const [lo, hi] = minMax(samples.map((row) => row[d]));
    const pad = 0.05 * ((hi - lo) || 1);
    ranges.push([lo - pad, hi + pad]);
  }
  for (let r = 0; r < k; r++) {
    for (let c = 0; c < k; c++) {
      const left = margin + c * cell;
      const top = r * cell;
      const panel = el("g", {class: "panel", "data-row": r, "data-col": c}, svg);
      el("rect", {class: "frame", x: left + 2, y: top + 2, width: cell - 4, height: cell - 4},
        panel);
      const px = scale(ranges[c][0], ranges[c][1], left + 5, left + cell - 5);
      if (r === c) {
        bars(panel, samples.map((row) => row[c]), ranges[c], px, top + cell - 4, cell - 12);
      } else {
        const py = scale(ranges[r][0], ranges[r][1], top + cell - 5, top + 5);
        for (const row of samples) {
          el("circle", {class: "sample", cx: px(row[c]).toFixed(1), cy: py(row[r]).toFixed(1),
            r: 1.3}, panel);
        }
      }
    }
    el("text", {x: margin + r * cell + cell / 2, y: size - 10, "text-anchor": "middle"}, svg,
      `x${r}`);
    el("text", {x: 14, y: r * cell + cell / 2, "text-anchor": "middle"}, svg, `x${r}`);
  }
  container.replaceChildren(svg);
}

function bars(parent, values, range, px, base, height, bins = 20) {
  const counts = new Array(bins).fill(0);
  const width = (range[1] - range[0]) / bins;
  for (const v of values) counts[Math.min(bins - 1, Math.max(0, Math.floor((v - range[0]) / width)))]++;
  const most = minMax(counts)[1] || 1;
  counts.forEach((n, b) => {
    const h = (n / most) * height;
    el("rect", {class: "bar", x: px(range[0] + b * width).toFixed(1), y: (base - h).toFixed(1),
      width: Math.max(0.5, px(range[0] + width) - px(range[0]) - 1).toFixed(1),
      height: h.toFixed(1)}, parent);
  });
}

/** Sampled images in a grid: rows of C*H*W values drawn as C x H x W pictures, rounded to
 * the data's `levels` (0 .. levels-1) when the model has them, else scaled to their range. */
export function imageGrid(container, samples, shape, levels) {
  const [channels, height, width] = shape;
  const plane = height * width;
  let lo = 0;
  let hi = (levels || 2) - 1;
  if (!levels) [lo, hi] = minMax(samples.flat());
  const toByte = (v) => {
    const level = levels ? Math.min(levels - 1, Math.max(0, Math.round(v))) : v;
    return Math.round((255 * (level - lo)) / ((hi - lo) || 1));
  };
  const grid = document.createElement("div");
  grid.className = "images";
  grid.id = "sample-images";
  for (const row of samples) {
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    canvas.className = "sample-image";
    const ctx = canvas.getContext("2d");
    const image = ctx.createImageData(width, height);
    for (let p = 0; p < plane; p++) {
      const rgb = channels >= 3 ? [0, 1, 2].map((c) => toByte(row[c * plane + p]))
        : [0, 0, 0].map(() => toByte(row[p]));
      image.data.set([...rgb, 255], 4 * p);
    }
    ctx.putImageData(image, 0, 0);
    grid.appendChild(canvas);
  }
  container.replaceChildren(grid);
}

/** The upper end of the drawn scale: the threshold, or far outliers of `values`
 * (beyond 3 interquartile ranges above the third quartile), stay off it. */
function upperFence(values, threshold) {
  if (values.length < 4) return Infinity;
  const sorted = [...values].sort((a, b) => a - b);
  const q1 = sorted[Math.floor(0.25 * (sorted.length - 1))];
  const q3 = sorted[Math.floor(0.75 * (sorted.length - 1))];
  const fence = q3 + 3 * Math.max(q3 - q1, 1e-9);
  return threshold === null ? fence : Math.max(fence, threshold + 0.25 * Math.abs(threshold - q1));
}

/** A histogram of `values`; with `threshold`, its line and the bars past it marked. Values
 * far above the rest (and the service's log-likelihood floor) get a bar of their own at the
 * right, off the scale, so one outlier does not squash the others into one bin. */
export function histogram(container, values, {xName, threshold = null, thresholdLabel = ""} = {}) {
  const svg = canvasOf(620, 300, `histogram of ${xName}`);
  svg.id = "histogram";
  const finite = values.filter((v) => Math.abs(v) < FLOOR);
  const fence = upperFence(finite, threshold);
  const onScale = finite.filter((v) => v <= fence);
  const off = values.length - onScale.length;
  let [lo, hi] = minMax(threshold === null ? onScale : [...onScale, threshold]);
  if (!Number.isFinite(lo)) [lo, hi] = [0, 1];
  const pad = 0.04 * ((hi - lo) || 1);
  [lo, hi] = [lo - pad, hi + pad];
  const area = {left: 52, right: off ? 520 : 600, top: 26, bottom: 250};
  const bins = 30;
  const width = (hi - lo) / bins;
  const counts = new Array(bins).fill(0);
  for (const v of onScale) counts[Math.min(bins - 1, Math.floor((v - lo) / width))]++;
  const most = Math.max(minMax(counts)[1], off, 1);
  const box = {x0: lo, x1: hi, y0: 0, y1: most};
  const {px, py} = axes(svg, box, area, xName, "rows");
  const group = el("g", {class: "bars"}, svg);
  counts.forEach((n, b) => {
    if (!n) return;
    const left = lo + b * width;
    const over = threshold !== null && left + width > threshold;
    el("rect", {class: over ? "bar over" : "bar", x: px(left).toFixed(1), y: py(n).toFixed(1),
      width: Math.max(1, px(left + width) - px(left) - 1).toFixed(1),
      height: (area.bottom - py(n)).toFixed(1), "data-count": n}, group);
  });
  if (off) {
    el("rect", {class: "bar over off-scale", x: area.right + 30, y: py(off).toFixed(1),
      width: 40, height: (area.bottom - py(off)).toFixed(1), "data-count": off}, group);
    el("text", {x: area.right + 50, y: area.bottom + 16, "text-anchor": "middle"}, svg,
      `> ${label(hi)}`);
    el("text", {x: area.right + 50, y: py(off) - 4, "text-anchor": "middle"}, svg, String(off));
  }
  if (threshold !== null) {
    el("line", {class: "threshold", x1: px(threshold), x2: px(threshold), y1: area.top - 8,
      y2: area.bottom, "data-threshold": threshold}, svg);
    const right = px(threshold) > 400; // the label on the side with room
    el("text", {class: "threshold-label", x: px(threshold) + (right ? -5 : 5), y: area.top - 12,
      "text-anchor": right ? "end" : "start"}, svg, thresholdLabel);
  }
  container.replaceChildren(svg);
}
