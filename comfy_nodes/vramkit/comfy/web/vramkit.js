// VRAMKit's frontend extension: shows what a VRAMKit node decided, on the node.
//
// A node's Python side returns {"ui": {"text": [summary], "vramkit_chart": [chart]}} (see vramkit/comfy/display.py
// for the chart format); ComfyUI sends it to the frontend after the node ran ("executed") and files it under
// /history. This extension puts the summary and, when there is one, the memory chart into one display widget:
//
// - a DOM widget (node.addDOMWidget, the frontend's public API) that is never serialised: options.serialize =
//   false keeps it out of the prompt (so ComfyUI's cache is not broken by the last summary) and widget.serialize
//   = false keeps it out of the saved workflow's widgets_values;
// - sized to its content: the node grows to show the whole summary; a very long summary scrolls inside a box of
//   at most MAX_TEXT_HEIGHT pixels;
// - the chart is inline SVG drawn from the node's "ui" data: nothing to install.
import { app } from "../../scripts/app.js";

const DISPLAY = "vramkit_display";
// Nodes that report what they decided; they get their (empty) display when created. Any other VRAMKit node
// that sends a summary gets one when it first does.
const REPORTING_NODES = new Set(["VRAMKitQuantize", "VRAMKitAttention", "VRAMKitOffload", "VRAMKitPrecision",
                                 "VRAMKitFreeAfter", "VRAMKitReport", "VRAMKitAutoOptimize"]);
const MIN_WIDTH = 380; // px: room for the title, the badge and a readable summary line
const MAX_TEXT_HEIGHT = 420; // px: taller summaries scroll
const MARGIN = 10; // the frontend's default DOM widget margin

const COMPONENTS = {
  resident_weights: { label: "weights kept in VRAM", color: "#4e79a7" },
  streamed_weights: { label: "streamed weights (in flight)", color: "#76b7b2" },
  activations: { label: "activations", color: "#f28e2b" },
  attention: { label: "attention", color: "#e15759" },
  other_models: { label: "other models (text encoder, VAE...)", color: "#b07aa1" },
  working: { label: "sampling working memory", color: "#edc948" },
  other: { label: "other", color: "#9c9c9c" },
};

const STYLE = `
.vramkit-display { box-sizing: border-box; display: flex; flex-direction: column; gap: 6px; overflow: hidden;
  font-family: Inter, Arial, sans-serif; /* = FONT */ color: var(--input-text, #ddd); }
.vramkit-display .vramkit-chart { flex: none; }
.vramkit-display .vramkit-chart:empty { display: none; }
.vramkit-display .vramkit-chart svg { display: block; }
.vramkit-display .vramkit-text { box-sizing: border-box; margin: 0; padding: 6px 8px; border-radius: 6px;
  flex: none; background: var(--comfy-input-bg, #222); font-size: 12px; line-height: 17px; white-space: pre-wrap;
  overflow-wrap: anywhere; overflow-y: auto; user-select: text; }
`;

function addStyle() {
  if (document.getElementById("vramkit-style")) return;
  const style = document.createElement("style");
  style.id = "vramkit-style";
  style.textContent = STYLE;
  document.head.append(style);
}

function formatBytes(bytes) {
  if (bytes == null || !Number.isFinite(bytes)) return "?";
  // Three significant digits, decided after rounding (9.999 GB reads "10.0 GB"), as display.format_bytes.
  const gb = bytes / 2 ** 30;
  if (gb >= 0.9995) return `${gb.toFixed(gb >= 99.95 ? 0 : gb >= 9.995 ? 1 : 2)} GB`;
  const mb = bytes / 2 ** 20;
  return `${mb.toFixed(mb >= 9.95 ? 0 : 1)} MB`;
}

const SVG_NS = "http://www.w3.org/2000/svg";
const FONT = "Inter, Arial, sans-serif";
let measureContext = null;

function textWidth(text, size) {
  measureContext ??= document.createElement("canvas").getContext("2d");
  measureContext.font = `${size}px ${FONT}`;
  return measureContext.measureText(text).width;
}

function svg(tag, attrs, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  if (text != null) el.textContent = text;
  return el;
}

// Stacked horizontal bars (one per bar of the chart: "predicted", "measured") against the device's capacity
// and the budget, with a legend of the components shown. Returns the SVG and its height in pixels.
function drawChart(chart, width) {
  const bars = (chart.bars ?? []).filter((bar) => Array.isArray(bar.segments));
  const totals = bars.map((bar) => bar.segments.reduce((sum, s) => sum + Math.max(0, s.bytes ?? 0), 0));
  const scaleMax = Math.max(chart.capacity_bytes ?? 0, chart.budget_bytes ?? 0, ...totals, 1);
  const labelWidth = 72;
  const x0 = labelWidth;
  const totalWidth = 58; // the totals column, right of the bars
  const x1 = width - totalWidth - 4;
  const px = (bytes) => x0 + ((x1 - x0) * Math.max(0, bytes)) / scaleMax;
  const barHeight = 18;
  const rowHeight = 26;
  const top = 20;
  const keys = [];
  for (const bar of bars) for (const s of bar.segments) if (!keys.includes(s.key)) keys.push(s.key);
  const legendLabel = (key) => {
    const info = COMPONENTS[key] ?? COMPONENTS.other;
    return bars.flatMap((bar) => bar.segments).find((s) => s.key === key)?.label ?? info.label;
  };
  // Two legend columns when every label fits in half the width, else one.
  const columns = keys.every((key) => textWidth(legendLabel(key), 10) + 18 <= width / 2) ? 2 : 1;
  const legendRows = Math.ceil(keys.length / columns);
  const legendTop = top + bars.length * rowHeight + 24;
  const height = legendTop + legendRows * 16 - 4;
  const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
  root.append(svg("title", {}, chart.title ?? "memory"));
  const text = (x, y, value, extra = {}) =>
    root.append(svg("text", { x, y, fill: "currentColor", "font-size": 11, ...extra }, value));
  text(0, 12, chart.title ?? "memory", { "font-weight": 600 });
  bars.forEach((bar, i) => {
    const y = top + i * rowHeight;
    text(0, y + 13, bar.label ?? "");
    root.append(svg("rect", { x: x0, y, width: x1 - x0, height: barHeight, fill: "rgba(127,127,127,0.15)" }));
    let start = 0;
    for (const s of bar.segments) {
      const bytes = Math.max(0, s.bytes ?? 0);
      if (bytes <= 0) continue;
      const info = COMPONENTS[s.key] ?? COMPONENTS.other;
      const rect = svg("rect", { x: px(start), y, width: Math.max(px(start + bytes) - px(start), 1),
                                 height: barHeight, fill: info.color });
      rect.append(svg("title", {}, `${s.label ?? info.label}: ${formatBytes(bytes)}`));
      root.append(rect);
      start += bytes;
    }
    text(width, y + 13, formatBytes(totals[i]), { "text-anchor": "end", "font-weight": 600 });
  });
  const barsBottom = top + bars.length * rowHeight - (rowHeight - barHeight);
  const marker = (bytes, name, dashed, anchorTop) => {
    if (!bytes) return;
    const x = px(bytes);
    root.append(svg("line", { x1: x, x2: x, y1: top - 4, y2: barsBottom + 4, stroke: "currentColor",
                              "stroke-width": 1.5, ...(dashed ? { "stroke-dasharray": "4 3" } : {}) }));
    const anchor = x > x1 - 40 ? "end" : x < x0 + 40 ? "start" : "middle";
    text(x, anchorTop ? top - 6 : barsBottom + 14, `${name} ${formatBytes(bytes)}`,
         { "text-anchor": anchor, "font-size": 10 });
  };
  marker(chart.capacity_bytes, chart.capacity_label ?? "capacity", false, true);
  marker(chart.budget_bytes, chart.budget_label ?? "budget", true, false);
  keys.forEach((key, i) => {
    const info = COMPONENTS[key] ?? COMPONENTS.other;
    const x = (i % columns) * Math.floor(width / columns);
    const y = legendTop + Math.floor(i / columns) * 16;
    root.append(svg("rect", { x, y: y - 9, width: 10, height: 10, fill: info.color }));
    text(x + 14, y, legendLabel(key), { "font-size": 10 });
  });
  return root;
}

// The text box's height for `text` at `width` px. Measured on the box itself when it is on the page at that
// width (its real styles: the Vue renderer's differ from the page's), else on a hidden copy.
function textHeight(box, text, width) {
  if (box.isConnected && Math.abs(box.clientWidth - width) < 1) {
    const height = box.style.height;
    box.style.height = "auto";
    const needed = box.scrollHeight;
    box.style.height = height;
    return needed;
  }
  const probe = document.createElement("div");
  probe.className = "vramkit-display";
  probe.style.cssText = `position:absolute; visibility:hidden; left:-10000px; top:0; width:${width}px;`;
  const copy = document.createElement("div");
  copy.className = "vramkit-text";
  copy.textContent = text;
  probe.append(copy);
  document.body.append(probe);
  const needed = copy.scrollHeight;
  probe.remove();
  return needed;
}

function contentWidth(node) {
  return Math.max(node.size[0] - 2 * MARGIN, 100);
}

// Lays the display out for the node's current width: the chart, then the text box at its full height (or
// MAX_TEXT_HEIGHT, then it scrolls). Returns the widget's height.
function layout(node, widget) {
  const state = widget.vramkit;
  // The narrower of the node's content width and the element's width on the page (the Vue renderer pads nodes
  // more; right after a resize the element may still have its old width): never too wide, so never clipped.
  const shown = widget.element?.isConnected ? widget.element.clientWidth : 0;
  const width = shown > 50 ? Math.min(shown, contentWidth(node)) : contentWidth(node);
  state.chartBox.replaceChildren();
  let height = 0;
  if (state.chart) {
    const chart = drawChart(state.chart, width);
    state.chartBox.append(chart);
    height += Number(chart.getAttribute("height")) + 6;
  }
  state.textBox.textContent = state.text;
  state.width = width;
  const textPx = Math.min(textHeight(state.textBox, state.text, width), MAX_TEXT_HEIGHT);
  state.textBox.style.height = `${textPx}px`;
  height += textPx;
  state.height = height + 2 * MARGIN;
  return state.height;
}

// Displays on the page, to check again when something reflows their text (a web font that loads late).
const DISPLAYS = new Set();

// Lays the display out again if its text no longer fits its box (it wraps differently than when measured).
function refit(node, widget) {
  const box = widget.vramkit.textBox;
  if (!widget.vramkit.text || !box.isConnected) return;
  if (box.scrollHeight > box.clientHeight + 1 && box.clientHeight < MAX_TEXT_HEIGHT) {
    layout(node, widget);
    fitNode(node);
  }
}

document.fonts?.addEventListener?.("loadingdone", () => {
  for (const { node, widget } of DISPLAYS) refit(node, widget);
});

function fitNode(node) {
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
  node.setDirtyCanvas?.(true, true);
}

function displayWidget(node) {
  let widget = node.widgets?.find((w) => w.name === DISPLAY);
  if (widget) return widget;
  const element = document.createElement("div");
  element.className = "vramkit-display";
  const chartBox = document.createElement("div");
  chartBox.className = "vramkit-chart";
  const textBox = document.createElement("div");
  textBox.className = "vramkit-text";
  element.append(chartBox, textBox);
  const state = { text: "", chart: null, height: 0, width: 0, chartBox, textBox };
  widget = node.addDOMWidget(DISPLAY, "vramkit_display", element, {
    serialize: false, // not an input: never sent with the prompt
    hideOnZoom: false,
    getValue: () => state.text,
    setValue: () => {}, // read-only: what the node last reported
    getMinHeight: () => state.height,
    getMaxHeight: () => state.height,
  });
  widget.serialize = false; // not saved in the workflow's widgets_values either
  widget.vramkit = state;
  // Lay out again when the element's width changes without the node's (the Vue renderer sizes it itself).
  const observer = new ResizeObserver(() => {
    const width = element.clientWidth;
    if (!state.text || width <= 50 || Math.abs(width - state.width) < 1) return;
    requestAnimationFrame(() => {
      layout(node, widget);
      fitNode(node);
    });
  });
  observer.observe(element);
  const entry = { node, widget };
  DISPLAYS.add(entry);
  const onRemove = widget.onRemove;
  widget.onRemove = function () {
    observer.disconnect();
    DISPLAYS.delete(entry);
    return onRemove?.apply(this, arguments);
  };
  let lastWidth = node.size[0];
  const onResize = node.onResize;
  node.onResize = function (size) {
    const result = onResize?.apply(this, arguments);
    if (state.text && Math.abs(size[0] - lastWidth) >= 1) {
      lastWidth = size[0];
      layout(this, widget);
      requestAnimationFrame(() => fitNode(this));
    }
    return result;
  };
  return widget;
}

function show(node, message) {
  const text = (message?.text ?? []).join("\n");
  const chart = (message?.vramkit_chart ?? []).find((c) => c && Array.isArray(c.bars)) ?? null;
  if (!text && !chart) return;
  const widget = displayWidget(node);
  widget.vramkit.text = text;
  widget.vramkit.chart = chart;
  if (node.size[0] < MIN_WIDTH) node.setSize([MIN_WIDTH, node.size[1]]);
  layout(node, widget);
  fitNode(node);
  // Once the frontend has placed the element at its final width, check that the text still fits.
  requestAnimationFrame(() => requestAnimationFrame(() => refit(node, widget)));
}

app.registerExtension({
  name: "VRAMKit.NodeDisplay",
  setup() {
    addStyle();
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("VRAMKit")) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      // The (empty) display exists from the start: the Vue node renderer (Nodes 2.0) shows only the widgets a
      // node has when it is mounted.
      if (REPORTING_NODES.has(nodeData.name)) displayWidget(this);
      // A new node is wide enough for its title and the source badge ("VRAM report" was cut at 140 px).
      if (this.size[0] < MIN_WIDTH) this.setSize([MIN_WIDTH, this.size[1]]);
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      show(this, message);
      return result;
    };
  },
});
