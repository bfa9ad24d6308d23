// DreaMoving frontend extension: colours the pack's nodes so DreaMoving graphs read at a glance.
import { app } from "../../scripts/app.js";

const COLORS = { color: "#3b2a63", bgcolor: "#2b1d4f" };

app.registerExtension({
  name: "DreaMoving.NodeStyle",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.category?.startsWith("DreaMoving")) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      this.color ??= COLORS.color;
      this.bgcolor ??= COLORS.bgcolor;
      return result;
    };
  },
});
