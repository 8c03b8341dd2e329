// Compare runs: one uPlot chart per metric, one series per job, drawn from the JSON that the results carry
// (#compare-data, portal/web/compare.py). Aligned by step or by wall time; smoothed with TensorBoard's
// debiased exponential moving average. Redrawn when htmx swaps new results in, and on the smoothing slider's
// `input` (before its `change` asks the server), so dragging it is immediate.
import uPlot from "uplot";

type Curve = { steps: number[]; seconds: number[]; values: number[] };
type Data = {
  jobs: { id: string; name: string; color: string }[];
  metrics: string[];
  curves: Record<string, Record<string, Curve>>;
};

// TensorBoard's smoothing: last = last * w + (1 - w) * v, divided by 1 - w^n so the start is not pulled to 0.
export function smooth(values: number[], weight: number): number[] {
  if (weight <= 0) return values.slice();
  let last = 0;
  return values.map((v, i) => {
    last = last * weight + (1 - weight) * v;
    return last / (1 - Math.pow(weight, i + 1));
  });
}

const plots: uPlot[] = [];

function draw(): void {
  const root = document.getElementById("compare-charts");
  const script = document.getElementById("compare-data");
  plots.splice(0).forEach((p) => p.destroy());
  if (!root || !script) return;
  const data = JSON.parse(script.textContent || "{}") as Data;
  const byTime = root.dataset.align === "time";
  const slider = document.getElementById("compare-smooth") as HTMLInputElement | null;
  const weight = Math.min(0.95, Math.max(0, Number(slider ? slider.value : root.dataset.smooth) || 0));
  const shown = document.getElementById("compare-smooth-value");
  if (shown) shown.textContent = String(weight);
  root.querySelectorAll<HTMLElement>(".chart[data-metric]").forEach((el) => {
    const metric = el.dataset.metric!;
    const lines = data.jobs.map((j) => {
      const c = data.curves[j.id]?.[metric];
      return { job: j, xs: c ? (byTime ? c.seconds : c.steps) : [], ys: c ? smooth(c.values, weight) : [] };
    });
    const xs = [...new Set(lines.flatMap((l) => l.xs))].sort((a, b) => a - b);
    const columns = lines.map((l) => {
      const at = new Map(l.xs.map((x, i) => [x, l.ys[i]] as [number, number]));
      return xs.map((x) => at.get(x) ?? null);
    });
    el.querySelector(".chart-empty")?.remove();
    el.replaceChildren();
    const plot = new uPlot(
      {
        title: metric,
        width: Math.max(260, el.clientWidth || 420),
        height: 240,
        scales: {
          x: { time: false },
          y: { range: (_u, min, max) => (min === max ? [min - 1, max + 1] : uPlot.rangeNum(min, max, 0.1, true)) },
        },
        axes: [{ label: byTime ? "seconds since the job's first point" : "step" }, {}],
        series: [
          { label: byTime ? "s" : "step" },
          ...lines.map((l) => ({ label: l.job.name, stroke: l.job.color, width: 2, spanGaps: true })),
        ],
      },
      [xs, ...columns] as uPlot.AlignedData,
      el,
    );
    plots.push(plot);
    // What tests and screen readers can read without the canvas: each job's last (smoothed) value.
    const last = lines.map((l) => (l.ys.length ? Number(l.ys[l.ys.length - 1].toFixed(6)) : null));
    el.dataset.last = JSON.stringify(last);
    el.dataset.points = JSON.stringify(lines.map((l) => l.xs.length));
    el.dataset.xMax = String(xs.length ? xs[xs.length - 1] : "");
    const parts = lines.map((l, i) => `${l.job.name} ${last[i] === null ? "no points" : `last ${last[i]}`}`);
    el.setAttribute(
      "aria-label",
      `${metric} by ${byTime ? "wall time" : "step"}${weight ? `, smoothed ${weight}` : ""}: ${parts.join("; ")}`,
    );
  });
  root.dataset.drawn = String(Number(root.dataset.drawn || "0") + 1);
}

document.addEventListener("DOMContentLoaded", draw);
document.addEventListener("htmx:afterSettle", draw);
// Back and forward restore htmx's snapshot of the page, whose canvases are blank: draw them again.
document.addEventListener("htmx:historyRestore", draw);
document.addEventListener("input", (e) => {
  if ((e.target as HTMLElement).id === "compare-smooth") draw();
});
