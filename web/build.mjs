// Bundles web/src into web/dist (index.html, app.js, app.css): everything the UI loads is in dist,
// nothing comes from a CDN. Example specs from ../specs are embedded at build time (src/examples.gen.json).
// Usage: node build.mjs [--watch] [--dev]   (--dev: no minification, inline source maps)
import * as esbuild from "esbuild";
import { copyFileSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "dist");
const watch = process.argv.includes("--watch");
const dev = watch || process.argv.includes("--dev");

// Example specs offered by the editor's dropdown: [label, path relative to specs/, kind].
const EXAMPLES = [
  ["quickstart (8 experts, top-2)", "quickstart.yaml", "run"],
  ["quickstart, dense baseline", "quickstart-dense.yaml", "run"],
  ["Mixtral mini", "reference/mixtral-mini.yaml", "run"],
  ["DeepSeek-V3 mini", "reference/deepseek-v3-mini.yaml", "run"],
  ["sweep: Pareto loss vs active params", "sweeps/quickstart-pareto.yaml", "sweep"],
  ["sweep: router choice", "sweeps/quickstart-router.yaml", "sweep"],
];

function writeExamples() {
  const specs = join(here, "..", "specs");
  const examples = [];
  for (const [label, path, kind] of EXAMPLES) {
    try {
      examples.push({ label, path, kind, text: readFileSync(join(specs, path), "utf8") });
    } catch {
      console.warn(`web build: example spec specs/${path} missing, left out`);
    }
  }
  writeFileSync(join(here, "src", "examples.gen.json"), JSON.stringify(examples, null, 1) + "\n");
}

writeExamples();
rmSync(dist, { recursive: true, force: true });
mkdirSync(dist, { recursive: true });
copyFileSync(join(here, "src", "index.html"), join(dist, "index.html"));

const options = {
  entryPoints: { app: join(here, "src", "main.ts") },
  bundle: true,
  format: "esm",
  target: "es2020",
  outdir: dist,
  minify: !dev,
  sourcemap: dev ? "inline" : false,
  legalComments: "none",
  logLevel: "info",
  loader: { ".json": "json" },
};

if (watch) {
  const ctx = await esbuild.context(options);
  await ctx.watch();
  console.log("watching web/src ...");
} else {
  await esbuild.build(options);
  const size = (f) => statSync(join(dist, f)).size;
  console.log(`web/dist: app.js ${(size("app.js") / 1024).toFixed(0)} KiB, app.css ${(size("app.css") / 1024).toFixed(0)} KiB`);
}
