// Builds the portal's static bundle into portal/static/portal/dist/ (served by Django; no CDN at run time).
// `npm run build`; the Makefile runs it when a source is newer than the bundle.
import { copyFileSync, mkdirSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "portal", "static", "portal", "dist");
mkdirSync(out, { recursive: true });

await esbuild.build({
  entryPoints: { app: join(here, "src", "app.ts"), job: join(here, "src", "job.ts"), compare: join(here, "src", "compare.ts"), "app-css": join(here, "src", "app.css") },
  outdir: out,
  bundle: true,
  minify: true,
  sourcemap: true,
  format: "iife",
  target: ["es2020"],
  logLevel: "warning",
});
// esbuild names a CSS entry after its key; the pages link app.css.
copyFileSync(join(out, "app-css.css"), join(out, "app.css"));
copyFileSync(join(here, "node_modules", "htmx.org", "dist", "htmx.min.js"), join(out, "htmx.min.js"));
// Written last: the Makefile's stamp of a complete build (portal/web/checks.py names the required files).
const files = ["app.js", "job.js", "compare.js", "app.css", "htmx.min.js"];
writeFileSync(join(out, "manifest.json"), JSON.stringify({ files, built_at: new Date().toISOString() }, null, 1));
