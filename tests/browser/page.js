// Page-side helpers for the browser tests, evaluated once per page (they use only what an extension sees:
// window.app, window.LiteGraph, the graph's nodes and widgets). Defines window.vramkitTest.
(() => {
  const DISPLAY = "vramkit_display";

  // A tiny graph with every VRAMKit node, on the test server's tiny SD1.5-shaped model. `variant` changes a
  // few inputs of every VRAMKit node so that two graphs built in one server session do not share a cache.
  // Built on the canvas, then opened as a workflow (app.loadGraphData, as when a user opens a file), so the
  // Vue renderer starts from a clean state instead of what it kept from the graph shown before.
  async function buildTinyGraph(variant) {
    const graph = app.graph;
    graph.clear();
    // Positions leave room for the summaries the nodes grow to show (set before the node is added: the Vue
    // renderer of older frontends takes a node's position when it is added, not later assignments).
    const add = (type, values, [column, y]) => {
      const node = LiteGraph.createNode(type);
      if (!node) throw new Error(`node type ${type} is not registered`);
      node.pos = [20 + column * 440, 50 + y];
      graph.add(node);
      for (const [name, value] of Object.entries(values)) {
        const widget = node.widgets?.find((w) => w.name === name);
        if (!widget) throw new Error(`${type} has no widget ${name}`);
        widget.value = value;
      }
      return node;
    };
    const link = (from, slot, to, input) => {
      const index = to.inputs.findIndex((i) => i.name === input);
      if (index < 0) throw new Error(`${to.type} has no input ${input}`);
      from.connect(slot, to, index);
    };
    const v = variant % 2;
    const unet = add("UNETLoader", { unet_name: "vramkit_tiny_sd15.safetensors" }, [0, 0]);
    const autoOptimize = add("VRAMKitAutoOptimize", { width: 64, height: 64, preset: "auto", vram_budget_gb: v ? 4 : 0 }, [4, 0]);
    const precision = add("VRAMKitPrecision", { compute_dtype: v ? "fp32" : "default" }, [0, 150]);
    const quantize = add("VRAMKitQuantize", { group_size: v ? 32 : 64 }, [0, 420]);
    const attention = add("VRAMKitAttention", { mode: "chunked" }, [1, 0]);
    const offload = add("VRAMKitOffload", { vram_budget_gb: v ? 0.5 : 0.3 }, [1, 300]);
    const measure = add("VRAMKitMeasure", { label: `browser test ${variant}` }, [1, 640]);
    const positive = add("VRAMKitTestConditioning", { text: `a lighthouse ${variant}`, kind: "sd15" }, [2, 0]);
    const negative = add("VRAMKitTestConditioning", { text: "", kind: "sd15" }, [2, 150]);
    const vae = add("VAELoader", { vae_name: "pixel_space" }, [2, 300]);
    const free = add("VRAMKitFreeAfter", {}, [2, 400]);
    const latent = add("EmptyLatentImage", { width: 64, height: 64 }, [3, 0]);
    const sampler = add("KSampler", { seed: 7 + variant, control_after_generate: "fixed", steps: 2 }, [3, 170]);
    const report = add("VRAMKitReport", {}, [3, 500]);
    link(unet, 0, autoOptimize, "model");
    link(autoOptimize, 0, precision, "model");
    link(precision, 0, quantize, "model");
    link(quantize, 0, attention, "model");
    link(attention, 0, offload, "model");
    link(offload, 0, measure, "model");
    link(measure, 0, sampler, "model");
    link(positive, 0, free, "anything");
    link(vae, 0, free, "vae");
    link(free, 0, sampler, "positive");
    link(negative, 0, sampler, "negative");
    link(latent, 0, sampler, "latent_image");
    link(latent, 0, autoOptimize, "latent");
    link(sampler, 0, report, "samples");
    const workflow = graph.serialize();
    await app.loadGraphData(workflow, true, true, `vramkit tiny graph ${variant}`);
    return app.graph._nodes.map((n) => ({ id: n.id, type: n.type }));
  }

  // Columns in graph order, each node below the previous one at its current size, so grown nodes never
  // overlap; then the view fits the graph.
  function arrange(columns = 4) {
    const nodes = [...app.graph._nodes].sort((a, b) => a.id - b.id);
    const title = LiteGraph.NODE_TITLE_HEIGHT ?? 30;
    const perColumn = Math.ceil(nodes.length / columns);
    let x = 20;
    for (let c = 0; c < columns; c++) {
      const column = nodes.slice(c * perColumn, (c + 1) * perColumn);
      let y = 20 + title;
      let width = 0;
      for (const node of column) {
        node.pos = [x, y];
        y += node.size[1] + title + 24;
        width = Math.max(width, node.size[0]);
      }
      x += width + 40;
    }
    app.graph.setDirtyCanvas(true, true);
  }

  // The canvas under the frontend's own overlays (side bar, top bar, Run button) where nodes are not covered.
  const CLEAR = { left: 80, top: 130, right: 40, bottom: 40 };

  function fitView() {
    const nodes = app.graph._nodes;
    const title = LiteGraph.NODE_TITLE_HEIGHT ?? 30;
    const left = Math.min(...nodes.map((n) => n.pos[0]));
    const top = Math.min(...nodes.map((n) => n.pos[1] - title));
    const right = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
    const bottom = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
    const canvas = app.canvas.canvas.getBoundingClientRect();
    const scale = Math.min(1, (canvas.width - CLEAR.left - CLEAR.right) / (right - left),
                           (canvas.height - CLEAR.top - CLEAR.bottom) / (bottom - top));
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [CLEAR.left / scale - left, CLEAR.top / scale - top];
    app.canvas.setDirty(true, true);
  }

  // Scale 1, `node` in the middle of the canvas, below the top bar: returns its rectangle on screen.
  function focus(id) {
    const node = app.graph.getNodeById(id);
    const title = LiteGraph.NODE_TITLE_HEIGHT ?? 30;
    const canvas = app.canvas.canvas.getBoundingClientRect();
    app.canvas.ds.scale = 1;
    app.canvas.ds.offset = [(canvas.width - node.size[0]) / 2 - node.pos[0], CLEAR.top + title - node.pos[1]];
    app.canvas.setDirty(true, true);
    return nodeRect(node);
  }

  function nodeRect(node) {
    const title = LiteGraph.NODE_TITLE_HEIGHT ?? 30;
    const canvas = app.canvas.canvas.getBoundingClientRect();
    const { scale, offset } = app.canvas.ds;
    return {
      x: canvas.left + (node.pos[0] + offset[0]) * scale,
      y: canvas.top + (node.pos[1] - title + offset[1]) * scale,
      width: node.size[0] * scale,
      height: (node.size[1] + title) * scale,
    };
  }

  // What each VRAMKit node's display shows and whether it fits: for the test's assertions.
  function displays() {
    return app.graph._nodes.filter((n) => n.type.startsWith("VRAMKit") && !n.type.startsWith("VRAMKitTest"))
      .map((node) => {
        const widget = node.widgets?.find((w) => w.name === DISPLAY);
        const out = { id: node.id, type: node.type, title: node.title, size: [...node.size], widget: !!widget };
        if (!widget) return out;
        const element = widget.element;
        const text = element.querySelector(".vramkit-text");
        const rect = element.getBoundingClientRect();
        const node_ = nodeRect(node);
        const style = getComputedStyle(element);
        Object.assign(out, {
          text: text?.textContent ?? "",
          connected: element.isConnected,
          shown: element.isConnected && style.display !== "none" && style.visibility !== "hidden" &&
            rect.width > 0 && rect.height > 0,
          rect: { x: rect.x, y: rect.y, width: rect.width, height: rect.height },
          node: node_,
          textScroll: text ? [text.scrollHeight, text.clientHeight, text.scrollWidth, text.clientWidth] : null,
          elementScroll: [element.scrollHeight, element.clientHeight],
          chart: !!element.querySelector(".vramkit-chart svg"),
          chartText: [...element.querySelectorAll(".vramkit-chart svg text")].map((t) => t.textContent),
          serialize: widget.serialize,
          optionsSerialize: widget.options?.serialize,
        });
        return out;
      });
  }

  function visibleDialogs() {
    return [...document.querySelectorAll(".p-dialog, [role='dialog'], .comfy-modal")]
      .filter((d) => d.offsetParent !== null || getComputedStyle(d).position === "fixed")
      .filter((d) => getComputedStyle(d).display !== "none" && d.getBoundingClientRect().height > 0)
      .map((d) => d.innerText.slice(0, 500));
  }

  function closeDialogs() {
    for (const button of document.querySelectorAll(
      ".p-dialog .p-dialog-close-button, .p-dialog [aria-label='Close'], .comfy-modal .comfy-modal-close")) {
      button.click();
    }
  }

  function titleFits(id) {
    const node = app.graph.getNodeById(id);
    const ctx = app.canvas.ctx;
    ctx.save();
    ctx.font = app.canvas.title_text_font ?? `${LiteGraph.NODE_TEXT_SIZE ?? 14}px Arial`;
    const width = ctx.measureText(node.getTitle?.() ?? node.title).width;
    ctx.restore();
    return { title: node.title, titleWidth: width, nodeWidth: node.size[0] };
  }

  window.vramkitTest = { buildTinyGraph, arrange, fitView, focus, displays, visibleDialogs, closeDialogs, titleFits };
})();
