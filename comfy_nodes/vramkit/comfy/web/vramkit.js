// Shows the text VRAMKit nodes return in their "ui" (summaries, VRAM reports) inside the node.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODES = new Set(["VRAMKitQuantize", "VRAMKitAttention", "VRAMKitOffload", "VRAMKitPrecision",
                       "VRAMKitFreeAfter", "VRAMKitReport"]);

app.registerExtension({
  name: "vramkit.ShowText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text ?? []).join("\n");
      let widget = this.widgets?.find((w) => w.name === "vramkit_text");
      if (!widget) {
        widget = ComfyWidgets.STRING(this, "vramkit_text", ["STRING", { multiline: true }], app).widget;
        widget.inputEl.readOnly = true;
        widget.serialize = false;
      }
      widget.value = text;
      this.onResize?.(this.size);
    };
  },
});
