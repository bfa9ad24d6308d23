// DreaMoving frontend extension.
// - Colours the pack's nodes so DreaMoving graphs read at a glance.
// - Puts a one-line description on the pack's cards in the template browser: for a custom pack's workflows the
//   frontend has only file names, which it shows as the title and again as the description. The descriptions come
//   from templates.json beside this file (written by `python dev.py workflows`).
// - A frame scrubber for the pack's frame previews (DWPose, ZoeDepth): a video's 16..160 frames would otherwise be
//   drawn as a grid of thumbnails too small to see. After a run the node shows one frame at a time, with a "frame"
//   slider and a play / pause button. Neither widget is saved with the workflow nor sent with the prompt.
import { app } from "../../scripts/app.js";

const COLORS = { color: "#3b2a63", bgcolor: "#2b1d4f" };
const PLAY_FPS = 8;

function redraw(node) {
  node.setDirtyCanvas?.(true, true);
  app.graph.setDirtyCanvas(true, true);
}

function showFrame(node, index) {
  const count = node.imgs?.length ?? 0;
  if (!count) return;
  node.imageIndex = ((Math.round(index) % count) + count) % count;
  const slider = node.dreamovingScrubber?.slider;
  if (slider && slider.value !== node.imageIndex) slider.value = node.imageIndex;
  redraw(node);
}

function stop(node) {
  const scrubber = node.dreamovingScrubber;
  if (scrubber?.timer) {
    clearInterval(scrubber.timer);
    scrubber.timer = null;
    scrubber.button.name = "▶ play";
  }
}

function addScrubber(node) {
  // serialize: false in the options keeps a widget out of the prompt, on the widget out of the saved workflow
  const slider = node.addWidget("slider", "frame", 0, (value) => { stop(node); showFrame(node, value); },
                                { min: 0, max: 1, step: 1, precision: 0, serialize: false });
  const button = node.addWidget("button", "▶ play", null, () => {
    const scrubber = node.dreamovingScrubber;
    if (scrubber.timer) return stop(node);
    scrubber.button.name = "❚❚ pause";
    scrubber.timer = setInterval(() => showFrame(node, (node.imageIndex ?? 0) + 1), 1000 / PLAY_FPS);
  }, { serialize: false });
  for (const widget of [slider, button]) widget.serialize = false;
  node.dreamovingScrubber = { slider, button, timer: null };
  return node.dreamovingScrubber;
}

function withScrubber(nodeType) {
  const onExecuted = nodeType.prototype.onExecuted;
  nodeType.prototype.onExecuted = function (output) {
    const result = onExecuted?.apply(this, arguments);
    const count = output?.images?.length ?? 0;
    if (count > 1) {
      const scrubber = this.dreamovingScrubber ?? addScrubber(this);
      stop(this);
      scrubber.slider.options.max = count - 1;
      scrubber.slider.value = 0;
      // the frontend loads the preview images after this call; show the first frame once they are there
      const wait = setInterval(() => {
        if ((this.imgs?.length ?? 0) === count) { clearInterval(wait); showFrame(this, 0); }
      }, 50);
      setTimeout(() => clearInterval(wait), 10000);
    }
    return result;
  };
  const onRemoved = nodeType.prototype.onRemoved;
  nodeType.prototype.onRemoved = function () {
    stop(this);
    return onRemoved?.apply(this, arguments);
  };
}

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

let descriptions = null;

function describeTemplateCards(known) {
  for (const [title, text] of Object.entries(known)) {
    const card = document.querySelector(`[data-testid="template-workflow-${CSS.escape(title)}"]`);
    const line = card?.querySelector("p");
    if (line && line.textContent !== text) {
      line.textContent = text;
      line.title = text;
    }
  }
}

app.registerExtension({
  name: "DreaMoving.TemplateDescriptions",
  async setup() {
    descriptions = fetch(new URL("templates.json", import.meta.url)).then((r) => (r.ok ? r.json() : {}))
      .catch(() => ({}));
    new MutationObserver(async () => {
      if (document.querySelector('[data-testid^="template-workflow-"]')) describeTemplateCards(await descriptions);
    }).observe(document.body, { childList: true, subtree: true });
  },
});

app.registerExtension({
  name: "DreaMoving.FrameScrubber",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.category?.startsWith("DreaMoving/Preprocess")) withScrubber(nodeType);
  },
});
