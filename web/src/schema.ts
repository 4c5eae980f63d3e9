// Completion and hover from the spec's JSON Schema (GET /api/schema): walks the schema along the YAML
// path at the cursor (yamlpath.ts), choosing the variant of each `kind:` union that the document names.
import type { Completion, CompletionContext, CompletionResult } from "@codemirror/autocomplete";
import type { EditorView, Tooltip } from "@codemirror/view";
import { contextAt, type Frame } from "./yamlpath";

type Schema = Record<string, any>;

export class SchemaIndex {
  constructor(readonly root: Schema) {}

  deref(node: Schema | undefined): Schema | undefined {
    let n = node;
    for (let i = 0; n && n.$ref && i < 20; i++) {
      const path = String(n.$ref).replace(/^#\//, "").split("/");
      let target: any = this.root;
      for (const part of path) target = target?.[part];
      n = target ? { ...target, ...withoutRef(n) } : undefined;
    }
    return n;
  }

  /** The alternatives of a node (anyOf / oneOf flattened, refs followed), interpolation strings left out. */
  variants(node: Schema | undefined): Schema[] {
    const n = this.deref(node);
    if (!n) return [];
    const alts = n.anyOf ?? n.oneOf;
    if (alts) return alts.flatMap((a: Schema) => this.variants(a)).filter((a: Schema) => !isInterpolation(a));
    if (n.allOf) return n.allOf.flatMap((a: Schema) => this.variants(a));
    return [n];
  }

  /** Object variants of a node, narrowed to the one whose `kind` const equals `kind` when given. */
  objects(node: Schema | undefined, kind?: string): Schema[] {
    const objs = this.variants(node).filter((v) => v.properties || v.additionalProperties || v.type === "object");
    if (!kind) return objs;
    const match = objs.filter((v) => this.deref(v.properties?.kind)?.const === kind);
    return match.length ? match : objs;
  }

  child(node: Schema | undefined, frame: Frame, kind?: string): Schema | undefined {
    if (frame.key === "-") {
      for (const v of this.variants(node)) {
        if (v.items) return v.items;
        if (v.prefixItems) return v.prefixItems[0];
      }
      return undefined;
    }
    for (const v of this.objects(node, kind)) {
      const p = v.properties?.[frame.key];
      if (p) return p;
      if (v.additionalProperties && typeof v.additionalProperties === "object") return v.additionalProperties;
    }
    return undefined;
  }

  /** The schema of the mapping at `frames`. */
  at(frames: Frame[]): Schema | undefined {
    let node: Schema | undefined = this.root;
    let kind: string | undefined;
    for (const frame of frames) {
      node = this.child(node, frame, kind);
      kind = frame.kind;
      if (!node) return undefined;
    }
    return node;
  }
}

function withoutRef(n: Schema): Schema {
  const { $ref: _ref, ...rest } = n;
  return rest;
}

function isInterpolation(s: Schema): boolean {
  return s.type === "string" && s.description === "OmegaConf interpolation";
}

/** A one-line type: "int > 0", "topk | switch | ...", "bool", "number | list". */
export function typeSummary(index: SchemaIndex, node: Schema | undefined): string {
  const parts = index.variants(node).map((v) => {
    if (v.const !== undefined) return JSON.stringify(v.const);
    if (v.enum) return v.enum.map((e: unknown) => JSON.stringify(e)).join(" | ");
    const kind = index.deref(v.properties?.kind)?.const;
    if (kind) return `{kind: ${kind}}`;
    if (v.type === "object" && v.title) return v.title;
    let t = v.type === "integer" ? "int" : v.type === "boolean" ? "bool" : (v.type ?? v.title ?? "any");
    if (v.type === "array" && v.items) t = `list of ${typeSummary(index, v.items)}`;
    const bounds: string[] = [];
    if (v.exclusiveMinimum !== undefined) bounds.push(`> ${v.exclusiveMinimum}`);
    if (v.minimum !== undefined) bounds.push(`>= ${v.minimum}`);
    if (v.exclusiveMaximum !== undefined) bounds.push(`< ${v.exclusiveMaximum}`);
    if (v.maximum !== undefined) bounds.push(`<= ${v.maximum}`);
    return bounds.length ? `${t} ${bounds.join(", ")}` : t;
  });
  return [...new Set(parts)].join(" | ");
}

function describe(index: SchemaIndex, prop: Schema | undefined): string {
  const d = index.deref(prop) ?? {};
  const lines: string[] = [];
  const desc = d.description ?? index.variants(prop).find((v) => v.description)?.description;
  if (desc) lines.push(desc);
  lines.push(`type: ${typeSummary(index, prop)}`);
  if (d.default !== undefined) lines.push(`default: ${JSON.stringify(d.default)}`);
  return lines.join("\n");
}

function keyOptions(index: SchemaIndex, node: Schema | undefined, kind: string | undefined, present: string[]): Completion[] {
  const seen = new Set<string>();
  const options: Completion[] = [];
  for (const v of index.objects(node, kind)) {
    const required = new Set<string>(v.required ?? []);
    for (const [key, prop] of Object.entries<Schema>(v.properties ?? {})) {
      if (seen.has(key) || present.includes(key)) continue;
      seen.add(key);
      options.push({
        label: key,
        apply: `${key}: `,
        type: "property",
        detail: typeSummary(index, prop) + (required.has(key) ? " (required)" : ""),
        info: describe(index, prop),
        boost: key === "kind" ? 10 : required.has(key) ? 5 : 0,
      });
    }
  }
  return options;
}

function valueOptions(index: SchemaIndex, node: Schema | undefined, kind: string | undefined, key: string): Completion[] {
  if (key === "kind") {
    // the variants of the union this mapping belongs to, not narrowed by the kind being typed
    return index.objects(node).flatMap((v) => {
      const c = index.deref(v.properties?.kind)?.const;
      return c === undefined ? [] : [{ label: String(c), type: "enum", detail: v.title, info: v.description }];
    });
  }
  const prop = index.child(node, { key }, kind);
  const options: Completion[] = [];
  for (const v of index.variants(prop)) {
    if (v.enum) for (const e of v.enum) options.push({ label: String(e), type: "enum" });
    if (v.const !== undefined) options.push({ label: String(v.const), type: "enum" });
    if (v.type === "boolean") options.push({ label: "true", type: "keyword" }, { label: "false", type: "keyword" });
    const k = index.deref(v.properties?.kind)?.const;
    if (k !== undefined) options.push({ label: `{kind: ${k}}`, type: "enum", detail: v.title, info: v.description });
  }
  return options;
}

export function schemaCompletion(getIndex: () => SchemaIndex | null) {
  return (context: CompletionContext): CompletionResult | null => {
    const index = getIndex();
    if (!index) return null;
    const doc = context.state.doc.toString();
    const ctx = contextAt(doc, context.pos);
    if (!ctx.word && !context.explicit && ctx.mode === "key") return null;
    const node = index.at(ctx.frames);
    const options =
      ctx.mode === "key"
        ? keyOptions(index, node, ctx.kind, ctx.present)
        : valueOptions(index, node, ctx.kind, ctx.key ?? "");
    if (!options.length) return null;
    return { from: ctx.from, options, validFor: /^[\w.\-/$]*$/ };
  };
}

/** Hover over a key: its description, type and default; over a `kind:` value: that variant's description. */
export function schemaHover(getIndex: () => SchemaIndex | null) {
  return (view: EditorView, pos: number): Tooltip | null => {
    const index = getIndex();
    if (!index) return null;
    const line = view.state.doc.lineAt(pos);
    const text = line.text;
    let start = pos - line.from;
    let end = start;
    while (start > 0 && /[\w.\-/$]/.test(text[start - 1])) start--;
    while (end < text.length && /[\w.\-/$]/.test(text[end])) end++;
    if (start === end) return null;
    const word = text.slice(start, end);
    const doc = view.state.doc.toString();
    const isKey = /^\s*:/.test(text.slice(end));
    const ctx = contextAt(doc, line.from + start);
    const node = index.at(ctx.frames);
    let body: string | null = null;
    if (isKey) {
      const prop = index.child(node, { key: word }, ctx.kind);
      if (prop) body = `${word}\n${describe(index, prop)}`;
    } else if (ctx.mode === "value" && ctx.key === "kind") {
      const variant = index.objects(node, word).find((v) => index.deref(v.properties?.kind)?.const === word);
      if (variant) body = `kind: ${word}${variant.title ? ` (${variant.title})` : ""}\n${variant.description ?? ""}`;
    }
    if (!body) return null;
    return {
      pos: line.from + start,
      end: line.from + end,
      above: true,
      create: () => {
        const dom = document.createElement("div");
        dom.className = "cm-schema-hover";
        dom.textContent = body!;
        return { dom };
      },
    };
  };
}
