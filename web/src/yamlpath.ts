// Where the cursor is in a YAML spec, without parsing the (often half-typed) document: the chain of
// mapping keys above it (from indentation and open flow brackets), the `kind:` of each mapping on the
// way (to pick the variant of a discriminated union), and whether a key or a value is being typed.

/** One mapping level on the way from the document root to the cursor. `key` is "-" for a list item. */
export interface Frame {
  key: string;
  kind?: string;
}

export interface YamlContext {
  frames: Frame[]; // parents of the mapping the cursor is in
  kind?: string; // `kind:` of the mapping the cursor is in
  present: string[]; // keys already present in that mapping
  mode: "key" | "value";
  key?: string; // value mode: the key whose value is typed
  from: number; // document offset where the typed word starts
  word: string;
}

const KEY_LINE = /^(\s*)(-\s+)?([A-Za-z0-9_$][\w.\-/$]*|"[^"]*"|'[^']*')\s*:(?:\s+(.*))?$/;
const WORD = /[\w.\-/$]*$/;

interface LineInfo {
  indent: number; // column of the content (after a leading "- ")
  dashIndent: number | null; // column of the "-" when the line starts a list item
  key: string | null;
  value: string; // the text after "key:" (comment stripped), "" when the value is a nested block
}

function unquote(key: string): string {
  return /^["'].*["']$/.test(key) ? key.slice(1, -1) : key;
}

function stripComment(value: string): string {
  const hash = value.search(/(^|\s)#/);
  return (hash < 0 ? value : value.slice(0, hash)).trim();
}

function info(line: string): LineInfo | null {
  if (!line.trim() || /^\s*#/.test(line)) return null;
  const m = KEY_LINE.exec(line);
  const indent = line.length - line.trimStart().length;
  if (!m) {
    const dash = /^(\s*)-(\s+|$)/.exec(line);
    if (dash) return { indent: dash[0].length, dashIndent: dash[1].length, key: null, value: line.slice(dash[0].length) };
    return { indent, dashIndent: null, key: null, value: line.trim() };
  }
  const dashIndent = m[2] ? m[1].length : null;
  return {
    indent: m[1].length + (m[2]?.length ?? 0),
    dashIndent,
    key: unquote(m[3]),
    value: stripComment(m[4] ?? ""),
  };
}

/** `kind` and the keys of the block mapping whose keys sit at column `indent` around line `at`. */
function blockMapping(lines: string[], at: number, indent: number): { kind?: string; keys: string[] } {
  const keys: string[] = [];
  let kind: string | undefined;
  const visit = (i: number): boolean => {
    const li = info(lines[i]);
    if (!li) return true;
    if (li.indent < indent || (li.dashIndent !== null && li.dashIndent < indent)) return false;
    if (li.indent === indent && li.key) {
      keys.push(li.key);
      if (li.key === "kind") kind = li.value.replace(/^["']|["']$/g, "") || kind;
    }
    return true;
  };
  for (let i = at; i >= 0; i--) {
    if (!visit(i)) break;
    const li = info(lines[i]);
    if (li && li.dashIndent !== null && li.indent === indent) break; // the item's first line
  }
  for (let i = at + 1; i < lines.length; i++) {
    const li = info(lines[i]);
    if (li && li.dashIndent !== null && li.indent <= indent) break; // the next list item
    if (!visit(i)) break;
  }
  return { kind, keys: keys.filter((k, i) => keys.indexOf(k) === i) };
}

/** Parents of a block line whose content starts at column `indent` (`dashed`: it opens a list item). */
function blockFrames(lines: string[], lineIdx: number, indent: number, dashed: boolean): Frame[] {
  const frames: Frame[] = [];
  let limit = indent;
  let allowEqual = false; // a list may sit at the same column as its key
  if (dashed) {
    frames.unshift({ key: "-" });
    allowEqual = true;
  }
  for (let i = lineIdx - 1; i >= 0 && limit > 0; i--) {
    const li = info(lines[i]);
    if (!li) continue;
    const startCol = li.dashIndent ?? li.indent;
    if (li.key && li.value === "" && (li.indent < limit || (allowEqual && li.indent <= limit))) {
      frames.unshift({ key: li.key, kind: blockMapping(lines, i + 1, childIndent(lines, i, li.indent)).kind });
      limit = li.dashIndent ?? li.indent;
      allowEqual = li.dashIndent !== null;
      if (li.dashIndent !== null) frames.unshift({ key: "-" });
      continue;
    }
    if (li.dashIndent !== null && li.indent <= limit && li.dashIndent < limit) {
      // a sibling key inside the same list item: the item itself is the parent mapping
      frames.unshift({ key: "-" });
      limit = li.dashIndent;
      allowEqual = true;
      continue;
    }
    if (startCol < limit) limit = startCol;
  }
  return frames;
}

function childIndent(lines: string[], keyLine: number, keyIndent: number): number {
  for (let i = keyLine + 1; i < lines.length; i++) {
    const li = info(lines[i]);
    if (li) return li.indent > keyIndent || li.dashIndent !== null ? li.indent : keyIndent + 2;
  }
  return keyIndent + 2;
}

/** Drops nested {...} and [...] groups so a flow mapping's own keys can be read. */
function flatten(flow: string): string {
  let prev = "";
  let s = flow;
  while (s !== prev) {
    prev = s;
    s = s.replace(/\{[^{}]*\}|\[[^[\]]*\]/g, "");
  }
  return s;
}

export function contextAt(doc: string, pos: number): YamlContext {
  const before = doc.slice(0, pos);
  const lineStart = before.lastIndexOf("\n") + 1;
  const lines = doc.split("\n");
  const lineIdx = before.split("\n").length - 1;
  const head = before.slice(lineStart); // current line up to the cursor
  const word = WORD.exec(head)![0];
  const from = pos - word.length;

  // open flow brackets on this line, outermost first
  const open: { ch: string; at: number }[] = [];
  let quote: string | null = null;
  for (let i = 0; i < head.length; i++) {
    const c = head[i];
    if (quote) {
      if (c === quote) quote = null;
    } else if (c === '"' || c === "'") quote = c;
    else if (c === "#" && (i === 0 || /\s/.test(head[i - 1]))) break;
    else if (c === "{" || c === "[") open.push({ ch: c, at: i });
    else if (c === "}" || c === "]") open.pop();
  }

  if (open.length) {
    const li = info(doc.slice(lineStart, doc.indexOf("\n", lineStart) < 0 ? undefined : doc.indexOf("\n", lineStart)));
    const baseIndent = li?.indent ?? 0;
    const frames = blockFrames(lines, lineIdx, baseIndent, li?.dashIndent != null);
    const fullLine = lines[lineIdx];
    open.forEach((o, n) => {
      if (n > 0 && open[n - 1].ch === "[") frames.push({ key: "-" });
      if (o.ch === "[") {
        if (n === 0) frames.push({ key: keyBefore(head.slice(0, o.at)) ?? "-" });
        return;
      }
      const key = n === 0 ? keyBefore(head.slice(0, o.at)) : open[n - 1].ch === "{" ? keyBefore(head.slice(open[n - 1].at + 1, o.at)) : null;
      if (key) frames.push({ key });
    });
    const inner = open[open.length - 1];
    if (inner.ch === "[") {
      return { frames: frames.slice(0, -1), mode: "value", key: frames[frames.length - 1]?.key, present: [], from, word };
    }
    const body = flatten(fullLine.slice(inner.at + 1));
    const present = [...body.matchAll(/(?:^|,)\s*([\w.\-/$]+)\s*:/g)].map((m) => m[1]);
    const kind = /(?:^|,)\s*kind\s*:\s*["']?([\w-]+)/.exec(body)?.[1];
    const token = flatten(head.slice(inner.at + 1)).split(",").pop()!;
    const colon = token.indexOf(":");
    const ctx = { frames, kind, present, from, word };
    if (colon >= 0) return { ...ctx, mode: "value", key: token.slice(0, colon).trim() };
    return { ...ctx, mode: "key" };
  }

  const dashed = /^\s*-\s+/.exec(head);
  const keyValue = /^\s*(?:-\s+)?([\w.\-/$"']+)\s*:\s*/.exec(head);
  const indent = dashed ? dashed[0].length : head.length - head.trimStart().length;
  const frames = blockFrames(lines, lineIdx, indent, !!dashed);
  const mapping = blockMapping(lines, lineIdx, indent);
  const ctx = { frames, kind: mapping.kind, present: mapping.keys, from, word };
  if (keyValue) {
    return { ...ctx, mode: "value", key: unquote(keyValue[1]) };
  }
  return { ...ctx, mode: "key" };
}

function keyBefore(text: string): string | null {
  const m = /([\w.\-/$]+)\s*:\s*$/.exec(text);
  return m ? m[1] : null;
}
