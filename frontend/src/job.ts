// The job page's live curves: history from /api/v1/jobs/{id}/metrics, then live points from the job's SSE
// stream (/api/v1/jobs/{id}/stream). EventSource reconnects by itself and sends Last-Event-ID, so a dropped
// connection resumes where it stopped; points are keyed by (name, step), so one delivered twice is drawn once.
import uPlot from "uplot";

type Point = { name: string; step: number; value: number };
type Series = { name: string; steps: number[]; values: number[] };

// Which metrics each chart draws; a name matching a pattern joins that chart (per-role rewards, for example).
// Multi-agent jobs add per-role (`reward/<role>/mean`, `game/<role>/...`) and per-policy (`policy/<name>/...`)
// series, and the in-job evaluation against the rule-based player (`eval/vs_rule/<policy>/...`).
const CHARTS: { id: string; title: string; match: RegExp }[] = [
  { id: "reward", title: "Reward (mean)", match: /^(reward\/(mean|[^/]+\/mean)|policy\/[^/]+\/reward\/mean)$/ },
  { id: "vs-rule", title: "Win or draw vs the rule-based player", match: /^eval\/vs_rule\/[^/]+\/win_or_draw$/ },
  { id: "illegal", title: "Illegal-move rate", match: /^((game|policy)\/[^/]+|eval\/vs_rule\/[^/]+)\/illegal_rate$/ },
  { id: "games", title: "Games: win and draw rates", match: /^((game|policy)\/[^/]+\/win_rate|game\/draw_rate)$/ },
  { id: "kl", title: "KL", match: /^(kl|policy\/[^/]+\/kl)$/ },
  { id: "entropy", title: "Entropy", match: /^(entropy|policy\/[^/]+\/entropy)$/ },
  { id: "loss", title: "Loss", match: /^(loss|policy_loss|value_loss|policy\/[^/]+\/loss)$/ },
  { id: "length", title: "Response length (tokens)", match: /^response_length\/mean$/ },
  { id: "throughput", title: "Throughput (tokens/s)", match: /^tokens_per_s$/ },
];
const COLORS = ["#1d4ed8", "#b91c1c", "#047857", "#7c3aed", "#b45309", "#0e7490"];

class Chart {
  readonly data = new Map<string, Map<number, number>>(); // metric name -> step -> value
  plot: uPlot | null = null;
  constructor(readonly el: HTMLElement, readonly title: string) {}

  add(name: string, step: number, value: number): void {
    let s = this.data.get(name);
    if (!s) this.data.set(name, (s = new Map()));
    s.set(step, value);
  }

  draw(): void {
    if (this.data.size === 0) return;
    this.el.hidden = false; // the multi-agent charts stay hidden until a job reports their metrics
    const names = [...this.data.keys()].sort();
    const steps = [...new Set(names.flatMap((n) => [...this.data.get(n)!.keys()]))].sort((a, b) => a - b);
    const columns: (number | null)[][] = names.map((n) => steps.map((st) => this.data.get(n)!.get(st) ?? null));
    const aligned = [steps, ...columns] as uPlot.AlignedData;
    const key = names.join("|");
    if (this.plot && this.plot.series.length - 1 === names.length && this.el.dataset.names === key) {
      this.plot.setData(aligned);
    } else {
      this.plot?.destroy();
      this.el.dataset.names = key;
      this.el.querySelector(".chart-empty")?.remove();
      this.plot = new uPlot(
        {
          title: this.title,
          width: Math.max(260, this.el.clientWidth || 420),
          height: 220,
          scales: {
            x: { time: false },
            // A flat series (reward 0 at every step) gets a small band around it, not uPlot's 0..100.
            y: { range: (_u, min, max) => (min === max ? [min - 1, max + 1] : uPlot.rangeNum(min, max, 0.1, true)) },
          },
          axes: [{ label: "step" }, {}],
          series: [{ label: "step" }, ...names.map((n, i) => ({ label: n, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true }))],
        },
        aligned,
        this.el,
      );
    }
    // What tests and screen readers can read without parsing the canvas.
    const primary = this.data.get(names[0])!;
    this.el.dataset.points = String(primary.size);
    this.el.dataset.lastStep = String(steps[steps.length - 1]);
    this.el.setAttribute("aria-label", `${this.title}: ${primary.size} points, last step ${steps[steps.length - 1]}`);
  }
}

function start(root: HTMLElement): void {
  const charts = new Map<string, Chart>();
  for (const c of CHARTS) {
    const el = root.querySelector<HTMLElement>(`[data-chart="${c.id}"]`);
    if (el) charts.set(c.id, new Chart(el, c.title));
  }
  const status = document.getElementById("live-status");
  const setStatus = (text: string) => {
    if (status) status.textContent = text;
    root.dataset.live = text;
  };
  const dirty = new Set<Chart>();
  const take = (p: Point) => {
    const spec = CHARTS.find((c) => c.match.test(p.name));
    const chart = spec && charts.get(spec.id);
    if (!chart || typeof p.value !== "number") return;
    chart.add(p.name, p.step, p.value);
    dirty.add(chart);
  };
  const flush = () => {
    dirty.forEach((c) => c.draw());
    dirty.clear();
  };

  const logBox = document.getElementById("log-tail");
  const appendLogs = (lines: { seq: number; line: string; stream: string }[]) => {
    if (!logBox) return;
    const seen = Number(logBox.dataset.lastSeq || "0");
    const fresh = lines.filter((l) => l.seq > seen);
    if (!fresh.length) return;
    const atBottom = logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 4;
    logBox.textContent += fresh.map((l) => l.line).join("\n") + "\n";
    logBox.dataset.lastSeq = String(fresh[fresh.length - 1].seq);
    // Keep the tail short in the page: the full log stays in the database.
    const all = (logBox.textContent || "").split("\n");
    if (all.length > 500) logBox.textContent = all.slice(-500).join("\n");
    if (atBottom) logBox.scrollTop = logBox.scrollHeight;
  };

  const timeline = document.getElementById("events");
  const appendEvent = (ev: { seq: number; created_at: string; actor: string; message: string; to_state?: string; kind: string }) => {
    if (!timeline || timeline.querySelector(`[data-seq="${ev.seq}"]`)) return;
    const li = document.createElement("li");
    li.dataset.seq = String(ev.seq);
    const when = document.createElement("time");
    when.dateTime = ev.created_at;
    when.textContent = ev.created_at.replace("T", " ").slice(0, 19);
    li.append(when, ` ${ev.to_state ? "→ " + ev.to_state : ev.kind}: ${ev.message || ""} (${ev.actor || "system"})`);
    timeline.appendChild(li);
  };

  // The id of the last frame received: where a new connection resumes. EventSource sends it by itself when
  // it reconnects; when the browser gave up (readyState CLOSED), we reconnect with it in the query string.
  let lastId = "";
  let source: EventSource | null = null;
  let reconnects = 0;
  const track = (e: Event) => {
    const id = (e as MessageEvent).lastEventId;
    if (id) lastId = id;
  };
  const openStream = () => {
    const url = lastId ? `${root.dataset.streamUrl}?last_event_id=${encodeURIComponent(lastId)}` : root.dataset.streamUrl!;
    const es = (source = new EventSource(url));
    es.onopen = () => setStatus("live");
    es.onerror = () => {
      if (es.readyState === EventSource.CLOSED && source === es) {
        setStatus("reconnecting");
        window.setTimeout(reopen, 2000);
      } else {
        setStatus("reconnecting");
      }
    };
    es.addEventListener("metrics", (e) => {
      track(e);
      for (const p of (JSON.parse((e as MessageEvent).data).points || []) as Point[]) take(p);
      flush();
    });
    es.addEventListener("log", (e) => {
      track(e);
      appendLogs(JSON.parse((e as MessageEvent).data).lines || []);
    });
    es.addEventListener("sync", track);
    for (const kind of ["event", "state"]) {
      es.addEventListener(kind, (e) => {
        track(e);
        appendEvent(JSON.parse((e as MessageEvent).data));
      });
    }
    es.addEventListener("end", (e) => {
      es.close();
      source = null;
      setStatus(`finished (${JSON.parse((e as MessageEvent).data).state})`);
      // The status header, checkpoints and buttons change with the final state: refresh them (htmx).
      document.body.dispatchEvent(new CustomEvent("job-finished"));
    });
  };
  const reopen = () => {
    source?.close();
    reconnects += 1;
    root.dataset.reconnects = String(reconnects);
    openStream();
  };
  // For people and tests: drop the connection and resume from the last frame received.
  (window as unknown as { jobStreamReconnect: () => void }).jobStreamReconnect = reopen;

  fetch(root.dataset.metricsUrl!, { credentials: "same-origin", headers: { Accept: "application/json" } })
    .then((r) => (r.ok ? r.json() : { series: [] }))
    .then((body: { series: Series[] }) => {
      for (const s of body.series) s.steps.forEach((step, i) => take({ name: s.name, step, value: s.values[i] }));
      flush();
    })
    .catch(() => undefined)
    .finally(openStream);
}

document.addEventListener("DOMContentLoaded", () => {
  const root = document.getElementById("job-live");
  if (root) start(root);
});
